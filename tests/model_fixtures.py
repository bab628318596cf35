"""Shards and settings the model tests share: a byte-level BPE over the bundled handbook pages.

A plugin of tests/conftest.py, so every test module can ask for `shards`; modules that train tiny
models also say `pytestmark = pytest.mark.usefixtures("one_thread")`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from resiliparse.extract.html2text import extract_plain_text

from gristmill import DATA_DIR
from gristmill.tokenize.recipes import objective_token_ids, train_byte_bpe
from gristmill.tokenize.shards import token_dtype, write_shard

PAGES = sorted((DATA_DIR / "sample_site" / "handbook" / "en-US").glob("*.html"))


def write_shards(folder: Path, texts: list[str], vocab_size: int, val_fraction: float = 0.1) -> Path:
    """Train a byte-level BPE on `texts`, encode them EOS-separated, write one train and one val shard."""
    tokenizer = train_byte_bpe(texts, vocab_size)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    eos = tokenizer.token_to_id("<|endoftext|>")
    ids = np.concatenate([np.array(tokenizer.encode(t).ids + [eos]) for t in texts])
    split = int(len(ids) * (1 - val_fraction))
    dtype = token_dtype(tokenizer.get_vocab_size())
    write_shard(folder / "train_000000.bin", ids[:split], dtype)
    write_shard(folder / "val_000000.bin", ids[split:], dtype)
    meta = {"vocab_size": tokenizer.get_vocab_size(), "eos_id": eos, "dtype": dtype.name, "tokenizer": "tokenizer.json",
            **objective_token_ids(tokenizer)}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


@pytest.fixture
def one_thread():
    """Tiny models are bound by per-op overhead; one thread is faster than two fighting for cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def handbook_texts() -> list[str]:
    return [extract_plain_text(p.read_text(errors="replace")) for p in PAGES]


@pytest.fixture(scope="module")
def shards(tmp_path_factory, handbook_texts) -> Path:
    return write_shards(tmp_path_factory.mktemp("shards"), handbook_texts, vocab_size=512)
