"""Held-out metrics of tokenizers, side by side: `report.json` and a Markdown table.

Definitions (the held-out documents were never trained on):
- `bytes_per_token`, `chars_per_token`: UTF-8 bytes / characters of text per token (higher = more
  compression).
- `fertility`: tokens per word, a word being a run of `\\w` characters; `fertility_by_lang` the
  same per document language. Languages written without spaces (ja, zh) have long "words", so
  compare them between tokenizers, not with other languages.
- `continued_words`: proportion of words covered by two or more tokens.
- `vocab_utilisation`: distinct ids used on the held-out text / vocabulary size.
- `unk_rate`: proportion of tokens that are the unknown token (0 for byte-level BPE).
- `round_trip`: proportion of documents with decode(encode(x)) == x; `round_trip_promised` says
  whether the recipe promises 1.0 (byte-level BPE without a normaliser).
- `longest_tokens`: the longest vocabulary entries, decoded.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from gristmill.pipeline import io

WORD = re.compile(r"\w+")
LONGEST = 10
REPORT_JSON = "report.json"
REPORT_MD = "report.md"


def _unk_id(tokenizer: Tokenizer) -> int | None:
    for token in ("[UNK]", "<unk>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    return None


def longest_tokens(tokenizer: Tokenizer, n: int = LONGEST) -> list[str]:
    """The `n` longest vocabulary entries as text (byte-level entries decoded)."""
    vocab = tokenizer.get_vocab(with_added_tokens=False)
    decoded = [(tokenizer.decode([i]), i) for i in vocab.values()]
    decoded.sort(key=lambda item: (-len(item[0]), item[1]))
    return [text for text, _ in decoded[:n]]


def evaluate(tokenizer: Tokenizer, texts: list[str], langs: list[str | None], round_trip_promised: bool) -> dict:
    """Metrics of one tokenizer on held-out `texts` (with their languages, None when unknown)."""
    if not texts:
        raise ValueError("no held-out documents to evaluate on; raise holdout_fraction")
    encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
    unk = _unk_id(tokenizer)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    used: set[int] = set()
    n_tokens = n_unk = n_words = n_continued = round_trips = 0
    words_by_lang: Counter[str] = Counter()
    tokens_by_lang: Counter[str] = Counter()
    for text, lang, enc in zip(texts, langs, encodings):
        ids = enc.ids
        used.update(ids)
        n_tokens += len(ids)
        if unk is not None:
            n_unk += ids.count(unk)
        spans = np.array([m.span() for m in WORD.finditer(text)], dtype=np.int64).reshape(-1, 2)
        offsets = np.array(enc.offsets, dtype=np.int64).reshape(-1, 2)
        # tokens overlapping each word: start before the word's end and end after its start
        per_word = np.searchsorted(offsets[:, 0], spans[:, 1], "left") - np.searchsorted(
            offsets[:, 1], spans[:, 0], "right"
        )
        n_words += len(spans)
        n_continued += int((per_word >= 2).sum())
        round_trips += tokenizer.decode(ids, skip_special_tokens=False) == text
        if lang:
            words_by_lang[lang] += len(spans)
            tokens_by_lang[lang] += len(ids)
    n_chars = sum(len(t) for t in texts)
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return {
        "vocab_size": vocab_size,
        "docs": len(texts),
        "tokens": n_tokens,
        "bytes_per_token": _ratio(n_bytes, n_tokens),
        "chars_per_token": _ratio(n_chars, n_tokens),
        "fertility": _ratio(n_tokens, n_words),
        "fertility_by_lang": {
            lang: _ratio(tokens_by_lang[lang], words) for lang, words in sorted(words_by_lang.items())
        },
        "continued_words": _ratio(n_continued, n_words),
        "vocab_utilisation": _ratio(len(used), vocab_size),
        "unk_rate": _ratio(n_unk, n_tokens),
        "round_trip": _ratio(round_trips, len(texts)),
        "round_trip_promised": round_trip_promised,
        "longest_tokens": longest_tokens(tokenizer),
    }


def _ratio(a: float, b: float) -> float:
    return round(a / b, 4) if b else 0.0


TABLE_COLUMNS = [
    ("tokenizer", "tokenizer"),
    ("kind", "kind"),
    ("vocab", "vocab_size"),
    ("bytes/token", "bytes_per_token"),
    ("chars/token", "chars_per_token"),
    ("fertility", "fertility"),
    ("continued words", "continued_words"),
    ("vocab used", "vocab_utilisation"),
    ("unk rate", "unk_rate"),
    ("round trip", "round_trip"),
]


def comparison_rows(report: dict) -> list[dict]:
    """One flat row per tokenizer with the table's columns (what the dashboard charts)."""
    rows = []
    for name, entry in report["tokenizers"].items():
        row = {"tokenizer": name, "kind": entry.get("kind", "")}
        row.update({key: entry["metrics"][key] for _, key in TABLE_COLUMNS[2:]})
        rows.append(row)
    return rows


def markdown_table(report: dict) -> str:
    """The comparison as Markdown: the main table, then fertility per language."""
    rows = comparison_rows(report)
    lines = ["| " + " | ".join(title for title, _ in TABLE_COLUMNS) + " |"]
    lines.append("|" + "|".join(" --- " for _ in TABLE_COLUMNS) + "|")
    for row in rows:
        cells = []
        for _, key in TABLE_COLUMNS:
            value = row[key]
            if key == "round_trip" and report["tokenizers"][row["tokenizer"]]["metrics"]["round_trip_promised"]:
                value = f"{value} (promised)"
            cells.append(str(value))
        lines.append("| " + " | ".join(cells) + " |")
    langs = sorted({lang for e in report["tokenizers"].values() for lang in e["metrics"]["fertility_by_lang"]})
    if langs:
        lines += ["", "Fertility (tokens per word) by language:", ""]
        lines.append("| tokenizer | " + " | ".join(langs) + " |")
        lines.append("|" + "|".join(" --- " for _ in range(len(langs) + 1)) + "|")
        for name, entry in report["tokenizers"].items():
            by_lang = entry["metrics"]["fertility_by_lang"]
            lines.append(f"| {name} | " + " | ".join(str(by_lang.get(lang, "")) for lang in langs) + " |")
    lines += ["", "Longest tokens:", ""]
    for name, entry in report["tokenizers"].items():
        shown = ", ".join(repr(t) for t in entry["metrics"]["longest_tokens"][:5])
        lines.append(f"- {name}: {shown}")
    return "\n".join(lines) + "\n"


def write_report(report: dict, folder: Path) -> None:
    """`report.json` and `report.md` in `folder`, atomically."""
    io.write_json_atomic(report, folder / REPORT_JSON)
    io.write_bytes_atomic(markdown_table(report).encode(), folder / REPORT_MD)
