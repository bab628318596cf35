"""The filter stage's rule families: their settings, the signals they measure, the rules they apply.

Each family is a config model (published default thresholds, each rule off when its threshold is
`null`) and a function `(Partition, config) -> Checked`: signal columns for every document, and per
rule, in the reference's order, a mask of the documents that fail it. The thresholds and rule order
follow datatrove's implementations of the papers (cited per family), so counts are comparable.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from pydantic import BaseModel, ConfigDict

from gristmill.pipeline.filter.text import (
    LINE_BREAKS,
    NO_SPACE_LANGUAGES,
    SENTENCE_TERMINALS,
    STOP_WORDS,
    TOKEN_PATTERN,
    Pieces,
    Tokens,
    hash_with_doc,
    per_doc_sum,
    ratio,
)
from gristmill.pipeline.languages import language_code


class RuleFamily(BaseModel):
    """Settings of one family of rules; `enabled: false` skips its signals and its rules."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = True


@dataclass
class Checked:
    """What one family found: signal columns, and per rule (in order) the documents failing it.
    `text` is set when the family rewrites documents (C4 line filtering)."""

    signals: dict[str, np.ndarray]
    failures: list[tuple[str, np.ndarray]]
    text: pa.Array | None = None
    stats: dict = field(default_factory=dict)


@dataclass
class Partition:
    """One partition's documents, split once and shared by every family."""

    text: pa.Array  # string, nulls replaced by ""
    lang: list[str]  # language codes ("en"), the default language where missing
    lang_score: np.ndarray  # NaN where missing
    url: list[str | None]

    @property
    def size(self) -> int:
        return len(self.text)

    @cached_property
    def texts(self) -> list[str]:
        return self.text.to_pylist()

    @cached_property
    def chars(self) -> np.ndarray:
        return pc.utf8_length(self.text).to_numpy(zero_copy_only=False).astype(np.int64)

    @cached_property
    def tokens(self) -> Tokens:
        return Tokens.of(self.texts)

    @cached_property
    def lines(self) -> Pieces:
        """str.splitlines() pieces (a trailing line break leaves one empty piece more)."""
        return Pieces.split(self.text, LINE_BREAKS)

    @cached_property
    def no_space(self) -> np.ndarray:
        """Documents in a language written without spaces between words."""
        return np.array([lang in NO_SPACE_LANGUAGES for lang in self.lang], dtype=bool)

    def count(self, substring: str) -> np.ndarray:
        return pc.count_substring(self.text, substring).to_numpy(zero_copy_only=False).astype(np.int64)


def _mask(values: pa.Array) -> np.ndarray:
    return values.to_numpy(zero_copy_only=False).astype(bool)


# ---------------------------------------------------------------------------------------- length


class LengthConfig(RuleFamily):
    """Character bounds. An empty page can't be judged by any other rule; past a million characters
    (Gopher's 100,000-word ceiling is about 600,000) a page is a dump, not a document."""

    min_chars: int | None = 1
    max_chars: int | None = 1_000_000


def check_length(part: Partition, config: LengthConfig) -> Checked:
    failures = []
    if config.min_chars is not None:
        failures.append(("too_short", part.chars < config.min_chars))
    if config.max_chars is not None:
        failures.append(("too_long", part.chars > config.max_chars))
    return Checked({}, failures)


# ------------------------------------------------------------------------------------------- url


class UrlConfig(RuleFamily):
    """A URL block list (RefinedWeb sec. G.1 / datatrove's URLFilter use the UT1 list). A blocked
    domain also blocks its subdomains; `blocked_words` match anywhere in the lower-cased URL.
    `blocked_domains_file` is a text file with one domain per line (`#` starts a comment)."""

    blocked_domains: list[str] = []
    blocked_domains_file: str | None = None
    blocked_words: list[str] = []


def load_blocked_domains(config: UrlConfig) -> frozenset[str]:
    domains = {d.strip().lower().lstrip(".") for d in config.blocked_domains if d.strip()}
    if config.blocked_domains_file:
        path = Path(config.blocked_domains_file)
        if not path.is_file():
            raise FileNotFoundError(f"filter url.blocked_domains_file: no such file {path}")
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.split("#", 1)[0].strip().lower()
            if line:
                domains.add(line.lstrip("."))
    return frozenset(domains)


def _host(url: str | None) -> str:
    try:
        return (urlsplit(url).hostname or "") if url else ""
    except ValueError:
        return ""


def _domain_blocked(host: str, domains: frozenset[str]) -> bool:
    parts = host.split(".")
    return any(".".join(parts[i:]) in domains for i in range(len(parts)))


def check_url(part: Partition, config: UrlConfig) -> Checked:
    failures = []
    domains = load_blocked_domains(config)
    if domains:
        blocked = np.array([_domain_blocked(_host(u), domains) for u in part.url], dtype=bool)
        failures.append(("blocked_domain", blocked))
    if config.blocked_words:
        lowered = pc.utf8_lower(pa.array(part.url, type=pa.string()).fill_null(""))
        hit = np.zeros(part.size, dtype=bool)
        for word in config.blocked_words:
            hit |= _mask(pc.match_substring(lowered, word.lower()))
        failures.append(("blocked_word", hit))
    return Checked({}, failures)


# -------------------------------------------------------------------------------------- language


class LanguageConfig(RuleFamily):
    """Language allow-list on the `lang`/`lang_score` columns from extract. An empty `allow` lets
    every language through. Codes compare in canonical form (`gristmill.pipeline.languages`), so
    `allow: [en, yue]`, `[eng, yue]` and `[en-US]` mean the same. `min_score` 0.65 is FineWeb's language-ID threshold (Penedo et al.
    2024); documents without a score are not judged on it."""

    allow: list[str] = []
    min_score: float | None = 0.65


def check_language(part: Partition, config: LanguageConfig) -> Checked:
    failures = []
    if config.allow:
        allowed = {language_code(code) for code in config.allow}
        failures.append(("not_allowed", np.array([lang not in allowed for lang in part.lang], dtype=bool)))
    if config.min_score is not None:
        score = part.lang_score
        failures.append(("low_score", ~np.isnan(score) & (score < config.min_score)))
    return Checked({}, failures)


# ----------------------------------------------------------------------------- gopher repetition


class GopherRepetitionConfig(RuleFamily):
    """Gopher's repetition removal, Table A1 of Rae et al. 2021 (arXiv:2112.11446): duplicate
    line/paragraph fractions 0.30, their character fractions 0.20; top n-gram character fraction
    0.20/0.18/0.16 for n = 2/3/4; duplicated n-gram character fraction 0.15 ... 0.10 for n = 5 ... 10.
    Fractions of characters are of the whole text's length, as in datatrove."""

    dup_para_frac: float | None = 0.3
    dup_para_char_frac: float | None = 0.2
    dup_line_frac: float | None = 0.3
    dup_line_char_frac: float | None = 0.2
    top_n_grams: dict[int, float] = {2: 0.2, 3: 0.18, 4: 0.16}
    dup_n_grams: dict[int, float] = {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}


LINE_BREAK = r"\n(?:[^\S\n]*\n)*"  # a line break and any whitespace-only lines after it
BLANK_LINE_BREAK = r"\n[^\S\n]*\n\s*"  # a break with at least one (whitespace-only) blank line
_HASH_MULTIPLIER = np.uint64(0x100000001B3)  # FNV-1a 64-bit prime: n-gram hash = polynomial in ids
_LOW = (1 << 32) - 1


def ngram_repetition_chars(
    tokens: Tokens, top_ns: list[int], dup_ns: list[int], n_docs: int
) -> tuple[dict[int, np.ndarray], dict[int, np.ndarray]]:
    """Per n and document, Gopher's two n-gram repetition measures, in characters:

    - top: count x length of the most frequent n-gram (words joined by spaces; ties go to the
      n-gram seen first, as Counter.most_common does);
    - dup: characters of n-grams repeating an earlier one, scanning left to right and jumping past
      each repeat (datatrove's find_all_duplicate; length = the words' characters).

    n grows from 2 upwards and an n-gram can only repeat where its (n-1)-gram prefix repeats, so
    each step groups only the starts whose prefix occurs twice or more; clean text leaves few."""
    top: dict[int, np.ndarray] = {}
    dup: dict[int, np.ndarray] = {}
    if not top_ns and not dup_ns:
        return top, dup
    position = tokens.position
    cumulative = np.concatenate([[0], np.cumsum(tokens.lengths)])
    hashes = tokens.ids.copy()
    members: np.ndarray | None = None  # starts whose (n-1)-gram occurs at least twice
    for n in range(2, max(top_ns + dup_ns) + 1):
        m = max(len(tokens.doc) - n + 1, 0)
        hashes = hashes[:m] * _HASH_MULTIPLIER + tokens.ids[n - 1 : n - 1 + m]
        starts = np.flatnonzero(position[:m] + n <= tokens.counts[tokens.doc[:m]])
        candidates = starts if members is None else members[members < m]
        candidates = candidates[position[candidates] + n <= tokens.counts[tokens.doc[candidates]]]
        keys = hash_with_doc(tokens.doc[candidates], hashes[candidates])
        _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
        frequency = counts[inverse].astype(np.int64)
        members = candidates[frequency >= 2]
        if n in top_ns:
            top[n] = _top_ngram(tokens, n, n_docs, starts, candidates, frequency, cumulative)
        if n in dup_ns:
            dup[n] = _greedy_duplicates(tokens, n, n_docs, candidates, inverse, first, cumulative)
    return top, dup


def _top_ngram(tokens, n, n_docs, starts, candidates, frequency, cumulative) -> np.ndarray:
    """count x characters of each document's most frequent n-gram (see ngram_repetition_chars)."""
    best = np.zeros(n_docs, dtype=np.int64)
    first_start = starts[np.r_[True, tokens.doc[starts[1:]] != tokens.doc[starts[:-1]]]] if len(starts) else starts
    best[tokens.doc[first_start]] = (1 << 32) + _LOW  # a document's first n-gram, seen once
    score = (frequency << 32) + (_LOW - tokens.position[candidates])
    np.maximum.at(best, tokens.doc[candidates], score)
    has = best > 0
    start = tokens.starts[has] + (_LOW - (best[has] & _LOW))
    out = np.zeros(n_docs, dtype=np.float64)
    out[has] = (best[has] >> 32) * (cumulative[start + n] - cumulative[start] + (n - 1))
    return out


def _greedy_duplicates(tokens, n, n_docs, candidates, inverse, first, cumulative) -> np.ndarray:
    """Characters of repeated n-grams under datatrove's left-to-right scan (see
    ngram_repetition_chars). Only repeats (n-grams seen earlier) can count, so only they are visited:
    a repeat counts when the first occurrence of its n-gram, or an earlier visited repeat of it, was
    not jumped over."""
    out = np.zeros(n_docs, dtype=np.float64)
    is_repeat = np.ones(len(candidates), dtype=bool)
    is_repeat[first] = False
    repeats = np.flatnonzero(is_repeat)
    if len(repeats) == 0:
        return out
    group_first = candidates[first]  # global start of each group's first occurrence
    repeat_doc = tokens.doc[candidates[repeats]]
    for chunk in np.split(repeats, np.flatnonzero(np.diff(repeat_doc)) + 1):
        total = 0
        resume_at = -1  # starts before this were jumped over after the last repeat
        skipped: set[int] = set()
        visited_groups: set[int] = set()
        for start, group in zip(candidates[chunk].tolist(), inverse[chunk].tolist()):
            if start < resume_at:
                continue
            if group in visited_groups or int(group_first[group]) not in skipped:
                total += int(cumulative[start + n] - cumulative[start])
                skipped.update(range(start + 1, start + n))
                resume_at = start + n
            visited_groups.add(group)
        out[tokens.doc[candidates[chunk[0]]]] = total
    return out


def _duplicate_fractions(pieces: Pieces, n_docs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per document: pieces, repeated pieces, characters of repeated pieces."""
    total = np.bincount(pieces.doc, minlength=n_docs)
    repeated = pieces.repeated
    dup = np.bincount(pieces.doc[repeated], minlength=n_docs)
    dup_chars = per_doc_sum(pieces.lengths[repeated], pieces.doc[repeated], n_docs)
    return total, dup, dup_chars


def check_gopher_repetition(part: Partition, config: GopherRepetitionConfig) -> Checked:
    n_docs = part.size
    # Blank lines (whitespace-only ones too) are no lines and separate paragraphs, as in Gopher.
    text = pc.utf8_trim_whitespace(part.text)
    paragraphs = Pieces.split(text, BLANK_LINE_BREAK)
    lines = Pieces.split(text, LINE_BREAK)
    para_total, para_dup, para_dup_chars = _duplicate_fractions(paragraphs, n_docs)
    line_total, line_dup, line_dup_chars = _duplicate_fractions(lines, n_docs)
    signals = {
        "gopher_dup_para_frac": ratio(para_dup, para_total),
        "gopher_dup_para_char_frac": ratio(para_dup_chars, part.chars),
        "gopher_dup_line_frac": ratio(line_dup, line_total),
        "gopher_dup_line_char_frac": ratio(line_dup_chars, part.chars),
    }
    failures = []
    for name in ("dup_para_frac", "dup_para_char_frac", "dup_line_frac", "dup_line_char_frac"):
        threshold = getattr(config, name)
        if threshold is not None:
            failures.append((name, signals[f"gopher_{name}"] > threshold))
    top, dup = ngram_repetition_chars(part.tokens, sorted(config.top_n_grams), sorted(config.dup_n_grams), n_docs)
    for n, threshold in sorted(config.top_n_grams.items()):
        signal = ratio(top[n], part.chars)
        signals[f"gopher_top_{n}_gram_char_frac"] = signal
        failures.append((f"top_{n}_gram", signal > threshold))
    for n, threshold in sorted(config.dup_n_grams.items()):
        signal = ratio(dup[n], part.chars)
        signals[f"gopher_dup_{n}_gram_char_frac"] = signal
        failures.append((f"dup_{n}_gram", signal > threshold))
    return Checked(signals, failures)


# -------------------------------------------------------------------------------- gopher quality


class GopherQualityConfig(RuleFamily):
    """Gopher's quality filters, Rae et al. 2021 sec. A.1.1: 50 to 100,000 words, mean word length
    3 to 10 characters, '#' and ellipsis to word ratios at most 0.1, at most 90 % of lines starting
    with a bullet and 30 % ending in an ellipsis, at least 80 % of words with a letter, at least two
    stop words. Words with only punctuation do not count towards words or their mean length.

    Mean word length is not judged for languages written without spaces (ja, zh, th, ...): their
    words are characters there. `stop_words` replaces the built-in list of the languages it names;
    documents in a language with no list are not judged on stop words."""

    min_doc_words: int | None = 50
    max_doc_words: int | None = 100_000
    min_avg_word_length: float | None = 3
    max_avg_word_length: float | None = 10
    max_symbol_word_ratio: float | None = 0.1
    max_bullet_lines_ratio: float | None = 0.9
    max_ellipsis_lines_ratio: float | None = 0.3
    min_alpha_words_ratio: float | None = 0.8
    min_stop_words: int | None = 2
    stop_words: dict[str, list[str]] = {}


def _distinct_stop_words(part: Partition, config: GopherQualityConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per document: how many distinct stop words of its language it contains (case-sensitive, as
    Gopher's list is matched in datatrove), and whether its language has a list at all."""
    lists = {**STOP_WORDS, **{language_code(lang): tuple(words) for lang, words in config.stop_words.items()}}
    has_list = np.array([lang in lists for lang in part.lang], dtype=bool)
    vocabulary = sorted({w for words in lists.values() for w in words})
    languages = sorted(lists)
    member = np.zeros((len(languages) + 1, len(vocabulary)), dtype=bool)  # last row: no list
    column = {w: i for i, w in enumerate(vocabulary)}
    for row, lang in enumerate(languages):
        member[row, [column[w] for w in lists[lang]]] = True
    row_of = {lang: i for i, lang in enumerate(languages)}
    doc_row = np.array([row_of.get(lang, len(languages)) for lang in part.lang], dtype=np.int64)
    tokens = part.tokens
    index = pc.index_in(tokens.values, value_set=pa.array(vocabulary, type=pa.string()))
    hit = np.flatnonzero(index.is_valid().to_numpy(zero_copy_only=False))
    word = index.filter(index.is_valid()).to_numpy(zero_copy_only=False).astype(np.int64)
    doc = tokens.doc[hit]
    keep = member[doc_row[doc], word]
    pairs = np.unique(doc[keep] * len(vocabulary) + word[keep])
    return np.bincount(pairs // max(len(vocabulary), 1), minlength=part.size), has_list


def check_gopher_quality(part: Partition, config: GopherQualityConfig) -> Checked:
    n_docs = part.size
    tokens = part.tokens
    n_tokens = tokens.counts
    words = per_doc_sum(tokens.is_word, tokens.doc, n_docs)
    word_chars = per_doc_sum(tokens.lengths * tokens.is_word, tokens.doc, n_docs)
    lines = part.lines
    stripped_left = pc.utf8_ltrim_whitespace(lines.values)
    stripped_right = pc.utf8_rtrim_whitespace(lines.values)
    bullet = lines.test(pc.or_(pc.starts_with(stripped_left, "•"), pc.starts_with(stripped_left, "-")))
    ellipsis = lines.test(pc.or_(pc.ends_with(stripped_right, "..."), pc.ends_with(stripped_right, "…")))
    # str.splitlines() yields no piece after a final line break and none at all for ""
    trailing = _mask(pc.match_substring_regex(part.text, f"(?:{LINE_BREAKS})$")) | (part.chars == 0)
    n_lines = np.bincount(lines.doc, minlength=n_docs) - trailing
    stop_words, has_stop_list = _distinct_stop_words(part, config)
    signals = {
        "gopher_words": words.astype(np.int64),
        "gopher_mean_word_length": ratio(word_chars, words),
        "gopher_hash_ratio": ratio(part.count("#"), n_tokens),
        "gopher_ellipsis_ratio": ratio(part.count("...") + part.count("…"), n_tokens),
        "gopher_bullet_lines_ratio": ratio(np.bincount(lines.doc[bullet], minlength=n_docs), n_lines),
        "gopher_ellipsis_lines_ratio": ratio(np.bincount(lines.doc[ellipsis], minlength=n_docs), n_lines),
        "gopher_alpha_words_ratio": ratio(per_doc_sum(tokens.has_letter, tokens.doc, n_docs), n_tokens),
        "gopher_stop_words": stop_words.astype(np.int64),
    }
    failures = []
    c, s = config, signals
    if c.min_doc_words is not None or c.max_doc_words is not None:
        too_few = s["gopher_words"] < c.min_doc_words if c.min_doc_words is not None else False
        too_many = s["gopher_words"] > c.max_doc_words if c.max_doc_words is not None else False
        failures.append(("doc_words", np.asarray(too_few | too_many, dtype=bool)))
    if c.min_avg_word_length is not None or c.max_avg_word_length is not None:
        mean = s["gopher_mean_word_length"]
        short = mean < c.min_avg_word_length if c.min_avg_word_length is not None else False
        long = mean > c.max_avg_word_length if c.max_avg_word_length is not None else False
        failures.append(("mean_word_length", np.asarray(short | long, dtype=bool) & ~part.no_space))
    if c.max_symbol_word_ratio is not None:
        failures.append(("hash_ratio", s["gopher_hash_ratio"] > c.max_symbol_word_ratio))
        failures.append(("ellipsis_ratio", s["gopher_ellipsis_ratio"] > c.max_symbol_word_ratio))
    if c.max_bullet_lines_ratio is not None:
        failures.append(("bullet_lines", s["gopher_bullet_lines_ratio"] > c.max_bullet_lines_ratio))
    if c.max_ellipsis_lines_ratio is not None:
        failures.append(("ellipsis_lines", s["gopher_ellipsis_lines_ratio"] > c.max_ellipsis_lines_ratio))
    if c.min_alpha_words_ratio is not None:
        failures.append(("alpha_words", s["gopher_alpha_words_ratio"] < c.min_alpha_words_ratio))
    if c.min_stop_words is not None:
        failures.append(("stop_words", has_stop_list & (s["gopher_stop_words"] < c.min_stop_words)))
    return Checked(signals, failures)


# -------------------------------------------------------------------------------------------- C4


CITATION_PATTERN = r"\[\d*\]|\[edit\]|\[citation needed\]"
POLICY_SUBSTRINGS = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
# a sentence ends at . ! ? before a space or the line's end, or at a full-width stop (no spaces in CJK)
_SENTENCE_END = r"[.!?]+[\"'”’)\]]*(?:\s|$)|[。！？]+[」』”’）]*"
C4_LINE_CHECKS = (
    "too_long_word", "no_terminal_punct", "too_few_words", "lorem_ipsum", "javascript", "curly_bracket", "policy",
)


class C4Config(RuleFamily):
    """C4's clean-up, Raffel et al. 2020 sec. 2.2 (as in the TFDS code and datatrove): keep only lines
    ending in terminal punctuation with at least 3 words, none longer than 1000 characters, without
    'javascript' or cookie/terms-of-use phrases; drop a page with 'lorem ipsum' or a curly bracket in
    a kept line, or with fewer than 5 sentences in its kept lines. Kept documents carry the rewritten
    text (kept lines joined by newlines); removed documents keep their original text.

    `end_punctuation` adds the full-width marks 。！？ to C4's . ? ! " ' so Chinese and Japanese lines
    are not all dropped; in documents of languages without spaces a line's words are its whitespace
    runs plus its CJK characters."""

    remove_citations: bool = True
    filter_no_terminal_punct: bool = True
    end_punctuation: list[str] = [".", "?", "!", '"', "'", "。", "！", "？"]
    min_num_sentences: int | None = 5
    min_words_per_line: int | None = 3
    max_word_length: int | None = 1000
    filter_lorem_ipsum: bool = True
    filter_javascript: bool = True
    filter_curly_bracket: bool = True
    filter_policy: bool = True


def check_c4(part: Partition, config: C4Config) -> Checked:
    n_docs = part.size
    lines = part.lines
    stripped = pc.utf8_trim_whitespace(lines.values)
    whitespace_words = pc.utf8_split_whitespace(stripped)
    n_words = pc.list_value_length(whitespace_words).to_numpy(zero_copy_only=False).astype(np.int64)
    cjk_lines = np.flatnonzero(part.no_space[lines.doc])
    if len(cjk_lines):
        cjk = pc.count_substring_regex(stripped.take(pa.array(cjk_lines)), r"[\p{Han}\p{Hiragana}\p{Katakana}]")
        n_words[cjk_lines] += cjk.to_numpy(zero_copy_only=False)
    n_lines = len(lines.doc)
    drop = {}
    if config.max_word_length is not None:
        word_lengths = pc.utf8_length(pc.list_flatten(whitespace_words)).to_numpy(zero_copy_only=False)
        longest = np.zeros(n_lines, dtype=np.int64)
        np.maximum.at(longest, pc.list_parent_indices(whitespace_words).to_numpy(zero_copy_only=False), word_lengths)
        drop["too_long_word"] = longest > config.max_word_length
    cited = pc.replace_substring_regex(stripped, CITATION_PATTERN, "") if config.remove_citations else stripped
    if config.filter_no_terminal_punct:
        ends = np.zeros(n_lines, dtype=bool)
        for mark in config.end_punctuation:
            ends |= _mask(pc.ends_with(cited, mark))
        drop["no_terminal_punct"] = ~ends | _mask(pc.ends_with(cited, "..."))
    if config.min_words_per_line is not None:
        drop["too_few_words"] = n_words < config.min_words_per_line
    lowered = pc.utf8_lower(cited)
    ends_page = {}  # checks that drop the whole page when a line that got this far fails them
    if config.filter_lorem_ipsum:
        ends_page["lorem_ipsum"] = _mask(pc.match_substring(lowered, "lorem ipsum"))
    if config.filter_javascript:
        drop["javascript"] = _mask(pc.match_substring(lowered, "javascript"))
    if config.filter_curly_bracket:
        ends_page["curly_bracket"] = _mask(pc.match_substring(cited, "{"))
    if config.filter_policy:
        policy = np.zeros(n_lines, dtype=bool)
        for phrase in POLICY_SUBSTRINGS:
            policy |= _mask(pc.match_substring(lowered, phrase))
        drop["policy"] = policy

    # a line's fate is decided by the first check that applies, in C4's order
    kept = np.ones(n_lines, dtype=bool)
    lines_removed: dict[str, int] = {}
    page_ending_line = {name: np.zeros(n_lines, dtype=bool) for name in ("lorem_ipsum", "curly_bracket")}
    for check in C4_LINE_CHECKS:
        if check in ends_page:
            page_ending_line[check] = kept & ends_page[check]
            kept &= ~ends_page[check]
        elif check in drop:
            removed = kept & drop[check]
            lines_removed[check] = int(removed.sum())
            kept &= ~removed

    sentences = pc.count_substring_regex(cited, _SENTENCE_END).to_numpy(zero_copy_only=False).astype(np.int64)
    sentences = np.maximum(sentences, 1)
    c4_sentences = per_doc_sum(sentences[kept], lines.doc[kept], n_docs).astype(np.int64)

    # the first page-ending line of a document says why the page goes
    enders = np.flatnonzero(page_ending_line["lorem_ipsum"] | page_ending_line["curly_bracket"])
    ender_doc, first = np.unique(lines.doc[enders], return_index=True)
    lorem_doc = np.zeros(n_docs, dtype=bool)
    lorem_doc[ender_doc] = page_ending_line["lorem_ipsum"][enders[first]]
    curly_doc = np.zeros(n_docs, dtype=bool)
    curly_doc[ender_doc] = ~lorem_doc[ender_doc]

    kept_text = cited.filter(pa.array(kept))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(lines.doc[kept], minlength=n_docs))]).astype(np.int32)
    joined = pc.binary_join(pa.ListArray.from_arrays(pa.array(offsets), kept_text), "\n")
    rewritten = pc.utf8_trim_whitespace(joined)
    new_chars = pc.utf8_length(rewritten).to_numpy(zero_copy_only=False).astype(np.int64)
    changed = _mask(pc.not_equal(rewritten, part.text))

    signals = {
        "c4_sentences": c4_sentences,
        "c4_lines_removed": np.bincount(lines.doc[~kept], minlength=n_docs).astype(np.int64),
        "c4_chars_removed": part.chars - new_chars,
    }
    failures = []
    if config.filter_lorem_ipsum:
        failures.append(("lorem_ipsum", lorem_doc))
    if config.filter_curly_bracket:
        failures.append(("curly_bracket", curly_doc))
    if config.min_num_sentences is not None:
        failures.append(("too_few_sentences", c4_sentences < config.min_num_sentences))
    stats = {"lines_removed": lines_removed, "lines_kept": int(kept.sum())}
    return Checked(signals, failures, text=rewritten, stats={"changed": changed, **stats})


# --------------------------------------------------------------------------------------- FineWeb


class FineWebConfig(RuleFamily):
    """FineWeb's own filters, Penedo et al. 2024 sec. 3.3 (datatrove's FineWebQualityFilter): at
    least 12 % of lines end in sentence-terminal punctuation, at most 67 % of lines are 30 characters
    or shorter, duplicated lines hold at most 1 % of characters, at most 0.3 newlines per word.
    Measured after C4's line filtering when C4 is on, as in FineWeb's pipeline."""

    line_punct_thr: float | None = 0.12
    line_punct_exclude_zero: bool = False
    short_line_thr: float | None = 0.67
    short_line_length: int = 30
    char_duplicates_ratio: float | None = 0.01
    new_line_ratio: float | None = 0.3


_ENDS_IN_TERMINAL = "[" + re.escape(SENTENCE_TERMINALS) + "]$"


def check_fineweb(part: Partition, config: FineWebConfig, text: pa.Array, changed: np.ndarray) -> Checked:
    """`text` is what FineWeb sees (C4's rewrite or the original); `changed` marks documents whose
    text differs from the partition's, whose words are counted again."""
    n_docs = part.size
    pieces = Pieces.split(text, "\n")
    lines = pieces.where(_mask(pc.not_equal(pc.utf8_trim_whitespace(pieces.values), "")))
    n_lines = np.bincount(lines.doc, minlength=n_docs)
    punct = lines.test(pc.match_substring_regex(lines.values, _ENDS_IN_TERMINAL))
    short = lines.lengths <= config.short_line_length
    _, _, dup_chars = _duplicate_fractions(lines, n_docs)
    newlines = pc.count_substring(text, "\n").to_numpy(zero_copy_only=False).astype(np.int64)
    chars = pc.utf8_length(text).to_numpy(zero_copy_only=False).astype(np.int64)
    n_tokens = part.tokens.counts.copy()
    if changed.any():
        texts = text.filter(pa.array(changed)).to_pylist()
        n_tokens[changed] = [len(TOKEN_PATTERN.findall(t)) for t in texts]
    signals = {
        "fineweb_line_punct_ratio": ratio(np.bincount(lines.doc[punct], minlength=n_docs), n_lines),
        "fineweb_short_line_ratio": ratio(np.bincount(lines.doc[short], minlength=n_docs), n_lines),
        "fineweb_char_dup_ratio": ratio(dup_chars, chars - newlines),
        "fineweb_list_ratio": ratio(newlines, n_tokens),
    }
    c, s = config, signals
    failures = [("empty", n_lines == 0)]
    if c.line_punct_thr is not None:
        low = s["fineweb_line_punct_ratio"] < c.line_punct_thr
        if c.line_punct_exclude_zero:
            low &= s["fineweb_line_punct_ratio"] > 0
        failures.append(("line_punct_ratio", low))
    if c.short_line_thr is not None:
        failures.append(("short_line_ratio", s["fineweb_short_line_ratio"] > c.short_line_thr))
    if c.char_duplicates_ratio is not None:
        failures.append(("char_dup_ratio", s["fineweb_char_dup_ratio"] > c.char_duplicates_ratio))
    if c.new_line_ratio is not None:
        failures.append(("list_ratio", s["fineweb_list_ratio"] > c.new_line_ratio))
    return Checked(signals, failures)
