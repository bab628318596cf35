"""The `filter` stage: the quality heuristics of C4, Gopher, RefinedWeb and FineWeb, explained.

Every document leaves with its measured signals as columns (`gopher_*`, `c4_*`, `fineweb_*`), kept
or removed, and a removed document's `reason` names the first rule it failed
(`gopher_quality:alpha_words`). Families run in a fixed order: length, url, language,
gopher_repetition, gopher_quality, c4, fineweb (datatrove's usual chain). Text is split into words
and lines once per partition and every rule is a vectorised pass over those splits.

`annotate_only: true` removes nothing: every document is kept with a `filter_reason` column (null
when it passes), so thresholds can be tuned on the dashboard first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from gristmill.pipeline import io
from gristmill.pipeline.filter.rules import (
    C4Config,
    Checked,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
    LanguageConfig,
    LengthConfig,
    Partition,
    UrlConfig,
    check_c4,
    check_fineweb,
    check_gopher_quality,
    check_gopher_repetition,
    check_language,
    check_length,
    check_url,
)
from gristmill.pipeline.languages import language_code
from gristmill.pipeline.stage import PartitionOutput, StageConfig, document_stage

ANNOTATION_COLUMN = "filter_reason"
MISSING_TEXT = "filter:missing_text"


class FilterConfig(StageConfig):
    """The filter stage. Each family is switched by `enabled` and each rule by its threshold
    (`null` turns one rule off). `default_language` stands in for documents without `lang`."""

    annotate_only: bool = False
    default_language: str = "en"
    length: LengthConfig = LengthConfig()
    url: UrlConfig = UrlConfig()
    language: LanguageConfig = LanguageConfig()
    gopher_repetition: GopherRepetitionConfig = GopherRepetitionConfig()
    gopher_quality: GopherQualityConfig = GopherQualityConfig()
    c4: C4Config = C4Config()
    fineweb: FineWebConfig = FineWebConfig()


# The families before FineWeb, in order; FineWeb runs last, on C4's rewritten text.
FAMILIES: tuple[tuple[str, Callable[[Partition, Any], Checked]], ...] = (
    ("length", check_length),
    ("url", check_url),
    ("language", check_language),
    ("gopher_repetition", check_gopher_repetition),
    ("gopher_quality", check_gopher_quality),
    ("c4", check_c4),
)

_RATIO_EDGES = [round(0.05 * i, 2) for i in range(21)]
# Fixed histogram bins per signal, so per-part counts add up across parts. A value below the first
# edge counts in the first bin, one past the last edge in the last bin.
HISTOGRAM_EDGES: dict[str, list[float]] = {
    "gopher_words": [0, 10, 25, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 100000],
    "gopher_mean_word_length": [float(i) for i in range(21)],
    "gopher_stop_words": [float(i) for i in range(12)],
    "c4_sentences": [0, 1, 2, 3, 4, 5, 10, 20, 50, 100, 1000],
    "c4_lines_removed": [0, 1, 2, 5, 10, 20, 50, 100, 1000],
    "c4_chars_removed": [0, 1, 10, 100, 1000, 10000, 100000],
    "fineweb_char_dup_ratio": [0, 0.0025, 0.005, 0.0075, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0],
    "fineweb_list_ratio": [round(0.05 * i, 2) for i in range(21)] + [2.0, 5.0],
}


def histogram(values: np.ndarray, edges: list[float]) -> dict[str, list]:
    """`{"edges": [...], "counts": [...]}` with len(counts) == len(edges) - 1."""
    bins = np.clip(np.searchsorted(np.asarray(edges, dtype=np.float64), values, side="right") - 1, 0, len(edges) - 2)
    return {"edges": list(edges), "counts": np.bincount(bins, minlength=len(edges) - 1).astype(int).tolist()}


def partition_of(table: pa.Table, config: FilterConfig) -> Partition:
    """The columns the rules read, with missing values filled: text "", lang the default."""
    n = table.num_rows
    text = table.column("text").combine_chunks().cast(pa.string()).fill_null("")
    default = language_code(config.default_language)
    langs = table.column("lang").to_pylist() if "lang" in table.column_names else [None] * n
    scores = (
        table.column("lang_score").cast(pa.float64()).to_numpy(zero_copy_only=False)
        if "lang_score" in table.column_names
        else np.full(n, np.nan)
    )
    urls = table.column("url").to_pylist() if "url" in table.column_names else [None] * n
    return Partition(
        text=text,
        lang=[language_code(lang) or default for lang in langs],
        lang_score=np.asarray(scores, dtype=np.float64),
        url=urls,
    )


def _set_column(table: pa.Table, name: str, values: pa.Array | np.ndarray) -> pa.Table:
    column = values if isinstance(values, pa.Array) else pa.array(values)
    if name in table.column_names:
        return table.set_column(table.schema.get_field_index(name), name, column)
    return table.append_column(name, column)


def signal_thresholds(config: FilterConfig) -> dict[str, dict[str, float]]:
    """Per signal column, the bounds in force (`min`: fail below, `max`: fail above), for charts."""
    bounds: dict[str, dict[str, float]] = {}

    def bound(signal: str, side: str, value: float | None, enabled: bool) -> None:
        if enabled and value is not None:
            bounds.setdefault(signal, {})[side] = value

    q, r, c4, fw = config.gopher_quality, config.gopher_repetition, config.c4, config.fineweb
    bound("gopher_words", "min", q.min_doc_words, q.enabled)
    bound("gopher_words", "max", q.max_doc_words, q.enabled)
    bound("gopher_mean_word_length", "min", q.min_avg_word_length, q.enabled)
    bound("gopher_mean_word_length", "max", q.max_avg_word_length, q.enabled)
    bound("gopher_hash_ratio", "max", q.max_symbol_word_ratio, q.enabled)
    bound("gopher_ellipsis_ratio", "max", q.max_symbol_word_ratio, q.enabled)
    bound("gopher_bullet_lines_ratio", "max", q.max_bullet_lines_ratio, q.enabled)
    bound("gopher_ellipsis_lines_ratio", "max", q.max_ellipsis_lines_ratio, q.enabled)
    bound("gopher_alpha_words_ratio", "min", q.min_alpha_words_ratio, q.enabled)
    bound("gopher_stop_words", "min", q.min_stop_words, q.enabled)
    for name in ("dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac"):
        bound(f"gopher_{name}", "max", getattr(r, name), r.enabled)
    for n, value in r.top_n_grams.items():
        bound(f"gopher_top_{n}_gram_char_frac", "max", value, r.enabled)
    for n, value in r.dup_n_grams.items():
        bound(f"gopher_dup_{n}_gram_char_frac", "max", value, r.enabled)
    bound("c4_sentences", "min", c4.min_num_sentences, c4.enabled)
    bound("fineweb_line_punct_ratio", "min", fw.line_punct_thr, fw.enabled)
    bound("fineweb_short_line_ratio", "max", fw.short_line_thr, fw.enabled)
    bound("fineweb_char_dup_ratio", "max", fw.char_duplicates_ratio, fw.enabled)
    bound("fineweb_list_ratio", "max", fw.new_line_ratio, fw.enabled)
    return bounds


def finalize_filter_stats(stats: dict[str, Any], config: FilterConfig) -> dict[str, Any]:
    """Add what the merged per-part stats can't carry: the settings and thresholds in force."""
    families = ("length", "url", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb")
    return {
        **stats,
        "annotate_only": config.annotate_only,
        "settings": {family: getattr(config, family).model_dump(mode="json") for family in families},
        "thresholds": signal_thresholds(config),
    }


@document_stage("filter", FilterConfig, finalize_stats=finalize_filter_stats)
def filter_documents(table: pa.Table, config: FilterConfig) -> PartitionOutput:
    """Measure every signal, name each document's first failed rule, keep or remove accordingly."""
    part = partition_of(table, config)
    n = part.size
    reason = np.full(n, None, dtype=object)
    reason[table.column("text").is_null().to_numpy(zero_copy_only=False)] = MISSING_TEXT
    signals: dict[str, np.ndarray] = {}
    failed_by_rule: dict[str, int] = {}

    def apply(family: str, checked: Checked) -> None:
        signals.update(checked.signals)
        for rule, mask in checked.failures:
            name = f"{family}:{rule}"
            failed_by_rule[name] = int(mask.sum())
            reason[mask & (reason == None)] = name  # noqa: E711 - elementwise test on an object array

    rewritten, changed = part.text, np.zeros(n, dtype=bool)
    c4_stats: dict[str, Any] = {}
    for family, check in FAMILIES:
        family_config = getattr(config, family)
        if not family_config.enabled:
            continue
        checked = check(part, family_config)
        apply(family, checked)
        if checked.text is not None:
            rewritten, changed = checked.text, checked.stats.pop("changed")
            c4_stats = checked.stats
    if config.fineweb.enabled:
        apply("fineweb", check_fineweb(part, config.fineweb, rewritten, changed))

    passing = reason == None  # noqa: E711
    out = table
    for name, values in signals.items():
        out = _set_column(out, name, values)
    stats: dict[str, Any] = {
        "removed_by_rule": {r: int(c) for r, c in zip(*np.unique(reason[~passing].astype(str), return_counts=True))},
        "failed_by_rule": failed_by_rule,
        "histograms": {name: histogram(v, HISTOGRAM_EDGES.get(name, _RATIO_EDGES)) for name, v in signals.items()},
    }
    if config.c4.enabled:
        rewritten_kept = changed & passing
        stats["c4"] = {
            **c4_stats,
            "docs_rewritten": int(rewritten_kept.sum()),
            "chars_removed": int(signals["c4_chars_removed"][rewritten_kept].sum()),
        }
    if config.annotate_only:
        kept = _set_column(out, ANNOTATION_COLUMN, pa.array(reason.tolist(), type=pa.string()))
        return PartitionOutput(kept=kept, removed=io.with_reason(kept.slice(0, 0), []), stats=stats)
    if config.c4.enabled:
        original = out.column("text").combine_chunks()
        text = pc.if_else(pa.array(changed & passing), rewritten.cast(original.type), original)
        out = _set_column(out, "text", text)
    kept = out.filter(pa.array(passing))
    removed = io.with_reason(out.filter(pa.array(~passing)), reason[~passing].tolist())
    return PartitionOutput(kept=kept, removed=removed, stats=stats)
