"""Side-by-side measurements against the tools people use today.

Run each from the repository root as a module, `python -m benchmarks.NAME --quick` (under a minute)
or without `--quick` (the full size): run as a plain script, `benchmarks/` would come first on the
import path and `benchmarks/tokenize.py` would shadow the standard library's `tokenize`.
"""
