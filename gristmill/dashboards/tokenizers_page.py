"""Tokenizers: how the trained tokenizers compare, per language, and how each splits a text a
person types; plus what the pack stage wrote."""

from __future__ import annotations

import html
from collections import defaultdict
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st
from tokenizers import Tokenizer

from gristmill.dashboards.run_data import Run, Signature, StageView, sample_rows, signature
from gristmill.dashboards.stage_gate import explain_state, metric, ready_stage
from gristmill.pipeline import io

TOKENIZER_FILE = "tokenizer.json"
LANG_SAMPLE_DOCS = 300  # documents encoded to measure bytes/token per language
DEFAULT_TEXT = "Debian's package manager installs 1,234 packages; Le gestionnaire de paquets installe tout."
_CHIP = ('<span title="id {id}" style="background:{bg}; border-radius:3px; padding:1px 2px; margin:1px; '
         'display:inline-block; font-family:monospace; white-space:pre">{text}<sub style="color:#555">{id}</sub></span>')
_COLOURS = ("#e3f2fd", "#fff3e0", "#e8f5e9", "#fce4ec", "#ede7f6", "#f1f8e9")


def tokenizer_files(stage: StageView) -> dict[str, Path]:
    """name -> tokenizer.json of every tokenizer the stage trained, in folder-name order."""
    return {p.parent.name: p for p in sorted(stage.dir.glob(f"*/{TOKENIZER_FILE}"))}


@st.cache_resource(show_spinner=False, max_entries=32)
def _load(path: str, mtime_ns: int) -> Tokenizer:
    return Tokenizer.from_file(path)


def load_tokenizer(path: Path) -> Tokenizer:
    """A cached tokenizer, loaded again when its file changes."""
    return _load(str(path), path.stat().st_mtime_ns)


def token_chips(tokenizer: Tokenizer, text: str) -> tuple[str, list[int]]:
    """HTML with each token of `text` as a coloured chip showing its id, and the ids."""
    encoding = tokenizer.encode(text, add_special_tokens=False)
    chips = []
    for i, (token_id, (start, end)) in enumerate(zip(encoding.ids, encoding.offsets)):
        piece = text[start:end] if end > start else encoding.tokens[i]
        chips.append(_CHIP.format(id=token_id, bg=_COLOURS[i % len(_COLOURS)], text=html.escape(piece)))
    return "".join(chips), encoding.ids


@st.cache_data(show_spinner=False, max_entries=16)
def _bytes_per_token_by_lang(tokenizers: Signature, documents: Signature) -> pd.DataFrame:
    parts = [Path(p) for p, _, _ in documents]
    docs = sample_rows(parts, ["text", "lang"], k=LANG_SAMPLE_DOCS, seed=0).to_pylist()
    rows = []
    for path, mtime, _ in tokenizers:
        tokenizer = _load(path, mtime)
        totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for doc in docs:
            if not doc["text"] or not doc["lang"]:
                continue
            totals[doc["lang"]][0] += len(doc["text"].encode())
            totals[doc["lang"]][1] += len(tokenizer.encode(doc["text"], add_special_tokens=False).ids)
        for lang, (n_bytes, n_tokens) in totals.items():
            if n_tokens:
                rows.append({"tokenizer": Path(path).parent.name, "lang": lang, "bytes/token": n_bytes / n_tokens})
    return pd.DataFrame(rows, columns=["tokenizer", "lang", "bytes/token"])


def render(run: Run) -> None:
    stage = ready_stage(run, "tokenizers", key="tokenizers-stage")
    if stage is not None:
        show_tokenizers(run, stage)
    packs = run.stages_of_type("pack")
    if packs:
        st.header("Token shards")
        for pack in packs:
            if explain_state(pack):
                show_pack(pack)


def show_tokenizers(run: Run, stage: StageView) -> None:
    stats = stage.stats()
    reports = stats.get("tokenizers") or {}
    table = pd.DataFrame(stats.get("table") or [])
    first = [c for c in ("tokenizer", "kind", "vocab_size", "bytes_per_token", "fertility") if c in table]
    table = table[first + [c for c in table.columns if c not in first]]
    holdout = stats.get("holdout") or {}
    cols = st.columns(4)
    metric(cols[0], "tokenizers", len(reports) or stage.status.counts.get("tokenizers"))
    metric(cols[1], "training documents", stage.status.counts.get("train_docs"))
    metric(cols[2], "held-out documents", holdout.get("docs"))
    best = table.loc[table["bytes_per_token"].idxmax(), "tokenizer"] if "bytes_per_token" in table else None
    metric(cols[3], "most bytes/token", best)
    for warning in stats.get("warnings") or []:
        st.warning(warning)

    st.subheader("Comparison on held-out documents")
    if table.empty:
        st.info("This stage's stats have no comparison table.")
    else:
        st.dataframe(table, hide_index=True, width="stretch")
    fertility = [{"tokenizer": name, "lang": lang, "fertility": value}
                 for name, entry in reports.items()
                 for lang, value in ((entry.get("metrics") or {}).get("fertility_by_lang") or {}).items()]
    files = tokenizer_files(stage)
    parts = [p for name in stage.status.inputs for p in io.kept_parts(run.dir / name)]
    left, right = st.columns(2)
    with left:
        st.subheader("Bytes per token by language")
        by_lang = _bytes_per_token_by_lang(signature(list(files.values())), signature(parts))
        if by_lang.empty:
            st.info("No trained tokenizer or no input documents with a language.")
        else:
            fig = px.bar(by_lang, x="lang", y="bytes/token", color="tokenizer", barmode="group")
            fig.update_layout(height=320, margin=dict(t=30, b=10))
            st.plotly_chart(fig, width="stretch")
            st.caption(f"Measured on up to {LANG_SAMPLE_DOCS} sampled input documents.")
    with right:
        st.subheader("Fertility by language (tokens per word)")
        if fertility:
            fig = px.bar(pd.DataFrame(fertility), x="lang", y="fertility", color="tokenizer", barmode="group")
            fig.update_layout(height=320, margin=dict(t=30, b=10))
            st.plotly_chart(fig, width="stretch")
        else:
            st.info("This stage's stats have no fertility per language.")

    st.subheader("Try it")
    text = st.text_area("text to tokenize", DEFAULT_TEXT, key="tokenizer-text")
    if not files:
        st.info("No tokenizer.json in the stage folder.")
    for name, path in files.items():
        chips, ids = token_chips(load_tokenizer(path), text)
        st.markdown(f"**{name}** · {len(ids)} tokens · {len(text.encode()) / max(1, len(ids)):.2f} bytes/token")
        st.html(f'<div style="line-height:2">{chips}</div>')
        st.code(" ".join(map(str, ids)), language="text", wrap_lines=True)


def show_pack(stage: StageView) -> None:
    stats = stage.stats()
    tokens = stats.get("tokens") or {}
    documents = stats.get("documents") or {}
    cols = st.columns(5)
    metric(cols[0], "train tokens", tokens.get("train"))
    metric(cols[1], "val tokens", tokens.get("val"))
    metric(cols[2], "documents", sum(documents.values()) if documents else None)
    metric(cols[3], "shards", len(stats.get("shard_files") or []))
    metric(cols[4], "encode tokens/s", stats.get("tokens_per_s"), "{:,.0f}")
    st.caption(f"`{stage.name}`: tokenizer {stats.get('tokenizer_source', '?')} · dtype {stats.get('dtype', '?')} · "
               f"engine {stats.get('engine', '?')} · EOS {stats.get('eos_token', '?')} (id {stats.get('eos_id', '?')})")
