"""The adapt operation: teach a frozen model a skill through a small adapter (instruct.py: LLaMA-Adapter,
LoRA, prefix tuning on the instruction tasks of data/instructions.py)."""
