"""The built-in pretraining loop: a Transformer in one file, trained from packed token shards.

`model.py` is the architecture, `config.py` the validated settings, `data.py` the shard loader,
`loop.py` the training loop (DDP under torchrun), `train.py` its command line, `sample.py`
generation from a checkpoint, and `stage.py` the `train` stage type.
"""
