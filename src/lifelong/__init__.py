"""lifelong: change pretrained models after pretraining without breaking what they know."""

__version__ = "0.1.0"
