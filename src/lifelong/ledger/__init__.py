"""The model ledger: a model's history of recorded, reversible, verified changes."""
