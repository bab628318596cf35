"""Side-by-side measurements against the tools people use today.

Run each from the repository root as a module, `python -m benchmarks.NAME --quick` (under a minute)
or without `--quick` (the full size): run as a plain script, `benchmarks/` would come first on the
import path, so no benchmark may share a name with a module it imports (`tokenize.py` would shadow
Python's `tokenize`, `tokenizers.py` the Hugging Face package): the tokenizer benchmark is `tokenizer_pack.py`.
"""
