"""Tokenizers and token shards: train BPE/WordPiece/Unigram, evaluate them, pack shards.

`recipes.py` says which parts each tokenizer is built from; `train.py` trains and saves one,
`evaluate.py` measures fertility and coverage, `pack.py` encodes documents into the shards that
`shards.py` reads and writes; `stages.py` holds the `tokenizers` and `pack` stage types.
"""
