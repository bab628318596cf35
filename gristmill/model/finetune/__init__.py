"""After pre-training: instruction tuning (`sft`), preference alignment (`dpo`) and transfer
learning to a classifier (`classify`), on gristmill's own loop (see `loop.py`)."""
