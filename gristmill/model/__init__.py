"""The built-in pretraining loop: decoder, encoder and encoder-decoder transformers in one file,
trained from packed token shards.

`model.py` is the architecture, `config.py` the validated settings, `data.py` the shard loader,
`objectives.py` how windows become inputs and targets (causal, prefix-LM, MLM, span corruption),
`loop.py` the training loop (DDP under torchrun), `train.py` its command line, `sample.py`
generation and fill-mask from a checkpoint, `export.py` the Hugging Face export, `cli.py` the
sample / fill-mask / export commands, and `stage.py` the `train` stage type.
"""
