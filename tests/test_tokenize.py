"""Tokenizer workbench: the three recipes, held-out evaluation, tiktoken export, token shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from resiliparse.extract.html2text import extract_plain_text
from tokenizers import Tokenizer, models, pre_tokenizers
from typer.testing import CliRunner

from gristmill import DATA_DIR
from gristmill.cli import app
from gristmill.tokenize import shards
from gristmill.tokenize.corpus import Sample, in_split, iter_documents
from gristmill.tokenize.evaluate import evaluate
from gristmill.tokenize.pack import pack, serial_map
from gristmill.tokenize.recipes import TokenizerSpec
from gristmill.tokenize.tiktoken_export import NotExportable, to_tiktoken
from gristmill.tokenize.train import load_tokenizer, save_tokenizer, train_tokenizer

SITE = DATA_DIR / "sample_site"


def page_language(path: Path) -> str:
    """handbook/<lang>/... pages carry their language in the path; the rest is English."""
    parts = path.relative_to(SITE).parts
    return parts[1].split("-")[0] if parts[0] == "handbook" else "en"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Path]:
    """The sample site's pages as plain text in two Parquet parts (id, text, lang)."""
    folder = tmp_path_factory.mktemp("corpus")
    pages = sorted(SITE.rglob("*.html"))
    rows = [
        {"id": str(p.relative_to(SITE)), "text": extract_plain_text(p.read_text(errors="replace"), main_content=True),
         "lang": page_language(p)}
        for p in pages
    ]
    half = len(rows) // 2
    parts = [folder / "part-00000.parquet", folder / "part-00001.parquet"]
    pq.write_table(pa.Table.from_pylist(rows[:half]), parts[0])
    pq.write_table(pa.Table.from_pylist(rows[half:]), parts[1])
    return parts


def all_docs(parts: list[Path]) -> list[dict]:
    return [row for p in parts for row in pq.read_table(p).to_pylist()]


SPECS = {
    "bpe": TokenizerSpec(name="bpe", kind="bpe", vocab_size=1500),
    "wordpiece": TokenizerSpec(name="wordpiece", kind="wordpiece", vocab_size=1500, lowercase=True),
    "unigram": TokenizerSpec(name="unigram", kind="unigram", vocab_size=1500),
}


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> dict[str, Path]:
    """The three kinds trained on the corpus minus a 10% held-out split, saved as folders."""
    root = tmp_path_factory.mktemp("tokenizers")
    folders = {}
    for name, spec in SPECS.items():
        result = train_tokenizer(spec, corpus, Sample("train", 0.1, seed=0))
        folders[name] = save_tokenizer(result, root / name)
    return folders


def test_holdout_split_is_deterministic_disjoint_and_never_trained_on(corpus):
    train_ids = [i for t in iter_documents(corpus, Sample("train", 0.1, 0)) for i in t["id"].to_pylist()]
    held_ids = [i for t in iter_documents(corpus, Sample("split", 0.1, 0)) for i in t["id"].to_pylist()]
    ids = [d["id"] for d in all_docs(corpus)]
    assert set(train_ids).isdisjoint(held_ids)
    assert sorted(train_ids + held_ids) == sorted(ids)
    assert 0 < len(held_ids) < len(ids) * 0.25
    assert list(in_split(ids, 0.1, 0)) == list(in_split(ids, 0.1, 0))
    assert list(in_split(ids, 0.1, 0)) != list(in_split(ids, 0.1, 1))


def test_sample_budget_stops_at_documents_and_bytes(corpus):
    by_docs = [t.num_rows for t in iter_documents(corpus, Sample(max_docs=7))]
    assert sum(by_docs) == 7
    tables = list(iter_documents(corpus, Sample(max_bytes=20_000)))
    sizes = [len(x.encode()) for t in tables for x in t["text"].to_pylist()]
    first_ten = [len(d["text"].encode()) for d in all_docs(corpus)][: len(sizes) + 1]
    assert sum(sizes) <= 20_000 < sum(first_ten)


def test_training_streams_part_by_part_and_a_capped_sample_never_opens_later_parts(corpus, tmp_path):
    unreadable = tmp_path / "part-99999.parquet"
    unreadable.write_bytes(b"not parquet: training must stop before it reaches this file")
    parts = corpus + [unreadable]
    first_part_docs = pq.ParquetFile(corpus[0]).metadata.num_rows
    spec = TokenizerSpec(name="capped", kind="bpe", vocab_size=600)
    trained = train_tokenizer(spec, parts, Sample(max_docs=first_part_docs + 3))
    assert trained.train_docs == first_part_docs + 3
    assert trained.tokenizer.get_vocab_size() > 300
    with pytest.raises(ValueError, match=r"part-99999\.parquet: not a readable Parquet file"):  # uncapped, the stream does reach it
        train_tokenizer(spec, parts, Sample())


def test_three_kinds_reload_round_trip_and_keep_special_tokens(trained, corpus):
    held = [d["text"] for d in all_docs(corpus) if in_split([d["id"]], 0.1, 0)[0]]
    bpe = Tokenizer.from_file(str(trained["bpe"] / "tokenizer.json"))
    assert bpe.get_vocab_size() == 1500
    assert all(bpe.decode(bpe.encode(t).ids) == t for t in held)
    assert bpe.token_to_id("<|endoftext|>") == 0
    assert bpe.encode("a<|endoftext|>b").tokens == ["a", "<|endoftext|>", "b"]

    wordpiece = Tokenizer.from_file(str(trained["wordpiece"] / "tokenizer.json"))
    encoding = wordpiece.encode("Debian Handbook")
    assert encoding.tokens[0] == "[CLS]" and encoding.tokens[-1] == "[SEP]"
    assert wordpiece.decode(encoding.ids) == "debian handbook"

    unigram = Tokenizer.from_file(str(trained["unigram"] / "tokenizer.json"))
    text = "The package manager installs packages."
    assert unigram.decode(unigram.encode(text).ids) == text
    unseen = unigram.encode("\U0001f9ea").ids  # a character never seen in training: "▁" then unknown
    assert unseen == [unigram.token_to_id("▁"), unigram.token_to_id("<unk>")]


def test_auto_tokenizer_loads_every_saved_folder(trained):
    transformers = pytest.importorskip("transformers")
    for name, folder in trained.items():
        hf = transformers.AutoTokenizer.from_pretrained(str(folder))
        raw = Tokenizer.from_file(str(folder / "tokenizer.json"))
        text = "Debian stable releases are supported for years."
        assert hf(text)["input_ids"] == raw.encode(text).ids, name
        assert hf.eos_token == SPECS[name].eos_token
    assert transformers.AutoTokenizer.from_pretrained(str(trained["wordpiece"])).unk_token == "[UNK]"


def test_evaluation_metrics_agree_with_their_definitions(trained, corpus):
    docs = [d for d in all_docs(corpus) if in_split([d["id"]], 0.1, 0)[0]]
    texts, langs = [d["text"] for d in docs], [d["lang"] for d in docs]
    bpe = load_tokenizer(trained["bpe"])
    metrics = evaluate(bpe, texts, langs, round_trip_promised=True)
    n_tokens = sum(len(bpe.encode(t).ids) for t in texts)
    assert metrics["tokens"] == n_tokens
    assert metrics["bytes_per_token"] == pytest.approx(sum(len(t.encode()) for t in texts) / n_tokens, abs=1e-4)
    assert metrics["unk_rate"] == 0.0 and metrics["round_trip"] == 1.0
    assert set(metrics["fertility_by_lang"]) == set(langs)
    assert 0 < metrics["continued_words"] < 1 and 0 < metrics["vocab_utilisation"] <= 1

    # WordPiece words are BERT's pre-tokens: on plain words, "continued" means more than one piece.
    wordpiece = load_tokenizer(trained["wordpiece"])
    words = "configuration administrator debian packages xylophonist quokka".split()
    pieces = [len(wordpiece.encode(w, add_special_tokens=False).ids) for w in words]
    m = evaluate(wordpiece, [" ".join(words)], [None], round_trip_promised=False)
    assert m["continued_words"] == pytest.approx(sum(p > 1 for p in pieces) / len(words), abs=1e-4)
    assert m["fertility"] == pytest.approx(sum(pieces) / len(words), abs=1e-4)


@pytest.mark.parametrize("pre_tokenizer", ["gpt2", "llama3"])
def test_tiktoken_export_gives_identical_ids(corpus, pre_tokenizer):
    spec = TokenizerSpec(name="b", kind="bpe", vocab_size=1200, pre_tokenizer=pre_tokenizer)
    tokenizer = train_tokenizer(spec, corpus, Sample()).tokenizer
    encoding = to_tiktoken(tokenizer)
    texts = [d["text"] for d in all_docs(corpus)]
    assert [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)] == encoding.encode_ordinary_batch(texts)


def test_tiktoken_export_refuses_what_it_cannot_reproduce(trained, corpus):
    for name in ("wordpiece", "unigram"):
        with pytest.raises(NotExportable, match="not BPE"):
            to_tiktoken(load_tokenizer(trained[name]))
    lowered = TokenizerSpec(name="b", kind="bpe", vocab_size=600, lowercase=True)
    with pytest.raises(NotExportable, match="normaliser"):
        to_tiktoken(train_tokenizer(lowered, corpus, Sample(max_docs=20)).tokenizer)


def stream_docs(tokens: np.ndarray, eos_id: int) -> list[list[int]]:
    """Split a token stream at EOS; every document must end with one."""
    assert tokens[-1] == eos_id
    cuts = np.nonzero(tokens == eos_id)[0]
    return [tokens[a + 1 if i else 0 : b].tolist() for i, (a, b) in enumerate(zip(np.r_[-1, cuts[:-1]], cuts))]


def read_split(out: Path, split: str) -> np.ndarray:
    """All shards of a split read with plain np.memmap past the 1024-byte header."""
    arrays = []
    for shard in sorted(out.glob(f"{split}_*.bin")):
        header = np.memmap(shard, dtype="<i4", mode="r", shape=(256,))
        dtype = {20240520: np.uint16, 20240801: np.uint32}[int(header[0])]
        arrays.append(np.memmap(shard, dtype=dtype, mode="r", offset=1024, shape=(int(header[2]),)))
    return np.concatenate(arrays)


def test_packed_shards_are_the_exact_documents_with_eos(trained, corpus, tmp_path):
    out = tmp_path / "pack"
    meta = pack(corpus, out, trained["bpe"], serial_map, val_fraction=0.1, seed=3, shard_tokens=40_000)
    bpe = load_tokenizer(trained["bpe"])
    eos = bpe.token_to_id("<|endoftext|>")
    assert meta["engine"] == "tiktoken" and meta["dtype"] == "uint16" and meta["eos_id"] == eos
    docs = all_docs(corpus)
    is_val = in_split([d["id"] for d in docs], 0.1, 3)
    for split, mask in (("train", ~is_val), ("val", is_val)):
        expected = [bpe.encode(d["text"]).ids for d, m in zip(docs, mask) if m]
        tokens = read_split(out, split)
        assert stream_docs(tokens, eos) == expected
        assert meta["tokens"][split] == tokens.size and meta["documents"][split] == len(expected)
    sizes = [s["tokens"] for s in meta["shards"] if s["split"] == "train"]
    assert sizes[:-1] == [40_000] * (len(sizes) - 1) and 0 < sizes[-1] <= 40_000
    for shard in meta["shards"]:
        assert shards.file_sha256(out / shard["file"]) == shard["sha256"]
    assert not (out / "_tokens").exists()
    assert load_tokenizer(out / meta["tokenizer"]).get_vocab_size() == 1500


def test_pack_falls_back_to_tokenizers_when_tiktoken_cannot_export(trained, corpus, tmp_path):
    meta = pack(corpus, tmp_path / "wp", trained["wordpiece"], serial_map, val_fraction=0.0, shard_tokens=10**6)
    assert meta["engine"] == "tokenizers" and "not exportable" in meta["engine_check"]["reason"]
    wordpiece = load_tokenizer(trained["wordpiece"])
    expected = [wordpiece.encode(d["text"], add_special_tokens=False).ids for d in all_docs(corpus) if d["text"]]
    assert stream_docs(read_split(tmp_path / "wp", "train"), meta["eos_id"]) == expected
    with pytest.raises(ValueError, match="engine tiktoken requested"):
        pack(corpus, tmp_path / "forced", trained["unigram"], serial_map, engine="tiktoken")


class Interrupted(Exception):
    """Stands for the process being killed at a chosen point."""


def test_killed_pack_resumes_without_reencoding_finished_parts_or_rewriting_shards(trained, corpus, tmp_path, monkeypatch):
    reference = pack(corpus, tmp_path / "clean", trained["bpe"], serial_map, val_fraction=0.1, shard_tokens=30_000)

    # First attempt: killed while writing the third shard.
    out = tmp_path / "resumed"
    real_write = shards.write_shard
    calls = []

    def write_then_die(path, tokens, dtype):
        calls.append(path)
        if len(calls) == 3:
            raise Interrupted
        return real_write(path, tokens, dtype)

    monkeypatch.setattr(shards, "write_shard", write_then_die)
    with pytest.raises(Interrupted):
        pack(corpus, out, trained["bpe"], serial_map, val_fraction=0.1, shard_tokens=30_000)
    monkeypatch.setattr(shards, "write_shard", real_write)
    finished = {p.name: p.stat().st_mtime_ns for p in out.glob("*_*.bin")}
    records = {p.name: p.stat().st_mtime_ns for p in (out / "_tokens").glob("*.json")}
    assert len(finished) == 2 and len(records) == 2 and not (out / "meta.json").exists()

    reused = []

    def counting_map(fn, items, description=""):
        reused.extend((out / "_tokens" / f"unit-{i:05d}.json").exists() for i, _ in items)
        return serial_map(fn, items)

    meta = pack(corpus, out, trained["bpe"], counting_map, val_fraction=0.1, shard_tokens=30_000)
    assert reused == [True, True]  # no unit was encoded again
    assert {name: (out / name).stat().st_mtime_ns for name in finished} == finished
    assert meta["shards"] == reference["shards"]


def test_large_vocabulary_packs_uint32_shards(corpus, tmp_path):
    docs = all_docs(corpus)[:20]
    words = sorted({w for d in docs for w in d["text"].split()})
    vocab = {"[UNK]": 0, "[EOS]": 1}
    vocab.update({f"<filler{i}>": 2 + i for i in range(70_000)})
    vocab.update({w: len(vocab) + i for i, w in enumerate(words)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "wordlevel.json"
    tokenizer.save(str(path))
    part = tmp_path / "docs.parquet"
    pq.write_table(pa.Table.from_pylist(docs), part)

    meta = pack([part], tmp_path / "pack", path, serial_map, val_fraction=0.0, shard_tokens=5_000, eos_token="[EOS]")
    assert meta["dtype"] == "uint32" and meta["vocab_size"] > 2**16 and meta["engine"] == "tokenizers"
    first = tmp_path / "pack" / meta["shards"][0]["file"]
    assert np.fromfile(first, dtype="<i4", count=2).tolist() == [20240801, 7]
    expected = [[vocab[w] for w in d["text"].split()] for d in docs if d["text"]]
    tokens = read_split(tmp_path / "pack", "train")
    assert stream_docs(tokens, 1) == expected and int(tokens.max()) > 2**16


def test_shard_writer_round_trips_both_dtypes_and_rejects_out_of_range(tmp_path):
    rng = np.random.default_rng(0)
    for vocab, magic in ((50_257, 20240520), (200_000, 20240801)):
        ids = rng.integers(0, vocab, size=10_001)
        dtype = shards.token_dtype(vocab)
        sha = shards.write_shard(tmp_path / f"v{vocab}.bin", ids, dtype)
        assert shards.file_sha256(tmp_path / f"v{vocab}.bin") == sha
        assert np.array_equal(shards.open_shard(tmp_path / f"v{vocab}.bin"), ids)
        assert int(np.fromfile(tmp_path / f"v{vocab}.bin", dtype="<i4", count=1)[0]) == magic
    with pytest.raises(ValueError, match="out of range"):
        shards.write_shard(tmp_path / "bad.bin", np.array([70_000]), shards.token_dtype(1000))


def test_spec_errors_name_the_tokenizer_and_key():
    with pytest.raises(ValueError, match="'u'.*min_frequency"):
        TokenizerSpec(name="u", kind="unigram", min_frequency=3)
    with pytest.raises(ValueError, match="eos_token '<eos>' is not in special_tokens"):
        TokenizerSpec(name="b", kind="bpe", eos_token="<eos>")
    with pytest.raises(ValueError, match="vocab_size >= 256"):
        TokenizerSpec(name="b", kind="bpe", vocab_size=100)


def test_cli_trains_compares_and_encodes(corpus, tmp_path):
    runner = CliRunner()
    inputs = [str(p) for p in corpus]
    for kind in ("bpe", "unigram"):
        result = runner.invoke(app, ["tokenizer", "train", *inputs, "--out", str(tmp_path / kind), "--kind", kind,
                                     "--vocab-size", "800"])
        assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["tokenizer", "compare", str(tmp_path / "bpe"), str(tmp_path / "unigram"),
                                 "-i", inputs[0], "-i", inputs[1], "--out", str(tmp_path / "report")])
    assert result.exit_code == 0, result.output
    assert "| bpe | bpe | 800 |" in result.output and "| unigram | unigram | 800 |" in result.output
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["tokenizers"]["bpe"]["metrics"]["round_trip"] == 1.0
    result = runner.invoke(app, ["tokenizer", "encode", str(tmp_path / "bpe"), *inputs, "--out", str(tmp_path / "shards")])
    assert result.exit_code == 0, result.output
    assert shards.read_meta(tmp_path / "shards")["engine"] == "tiktoken"
    result = runner.invoke(app, ["tokenizer", "train", str(tmp_path / "missing.parquet"), "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "missing.parquet" in result.output
