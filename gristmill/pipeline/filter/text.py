"""Word and line splitting shared by every filter rule, done once per partition.

A partition's texts are split into tokens with one regular expression per document (C speed), then
the flat token list becomes an Arrow array so every rule's per-token test is one vectorised call.
The tokenizer approximates the spaCy tokenizer datatrove uses for English (whitespace chunks,
leading and trailing punctuation split off, hyphens and slashes inside words split, URLs kept whole)
without a model; characters of scripts written without spaces (Chinese, Japanese kana) are one
token each, so word-based rules still measure something for those languages.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from itertools import chain

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Unicode's Sentence_Terminal characters (Unicode 15): what FineWeb counts as a line ending in
# punctuation, in every script.
SENTENCE_TERMINALS = (
    "!.?\u0589\u061d\u061e\u061f\u06d4\u0700\u0701\u0702\u07f9\u0837\u0839\u083d\u083e\u0964\u0965"
    "\u104a\u104b\u1362\u1367\u1368\u166e\u1735\u1736\u17d4\u17d5\u1803\u1809\u1944\u1945\u1aa8\u1aa9"
    "\u1aaa\u1aab\u1b4e\u1b4f\u1b5a\u1b5b\u1b5e\u1b5f\u1b7d\u1b7e\u1b7f\u1c3b\u1c3c\u1c7e\u1c7f\u2024"
    "\u203c\u203d\u2047\u2048\u2049\u2cf9\u2cfa\u2cfb\u2e2e\u2e3c\u2e53\u2e54\u2e60\u2e61\u3002\ua4ff"
    "\ua60e\ua60f\ua6f3\ua6f7\ua876\ua877\ua8ce\ua8cf\ua92f\ua9c8\ua9c9\uaa5d\uaa5e\uaa5f\uaaf0\uaaf1"
    "\uabeb\ufe12\ufe15\ufe16\ufe52\ufe56\ufe57\uff01\uff0e\uff1f\uff61\U00010a56\U00010a57\U00010f55"
    "\U00010f56\U00010f57\U00010f58\U00010f59\U00010f86\U00010f87\U00010f88\U00010f89\U00011047"
    "\U00011048\U000110be\U000110bf\U000110c0\U000110c1\U00011141\U00011142\U00011143\U000111c5"
    "\U000111c6\U000111cd\U000111de\U000111df\U00011238\U00011239\U0001123b\U0001123c\U000112a9"
    "\U000113d4\U000113d5\U0001144b\U0001144c\U000115c2\U000115c3\U000115c9\U000115ca\U000115cb"
    "\U000115cc\U000115cd\U000115ce\U000115cf\U000115d0\U000115d1\U000115d2\U000115d3\U000115d4"
    "\U000115d5\U000115d6\U000115d7\U00011641\U00011642\U0001173c\U0001173d\U0001173e\U00011944"
    "\U00011946\U00011a42\U00011a43\U00011a9b\U00011a9c\U00011c41\U00011c42\U00011ef7\U00011ef8"
    "\U00011f43\U00011f44\U00016a6e\U00016a6f\U00016af5\U00016b37\U00016b38\U00016b44\U00016d6e"
    "\U00016d6f\U00016e98\U0001bc9f\U0001da88"
)

# Han ideographs, kana and CJK compatibility ideographs: one token per character.
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
# Punctuation split off the edges of a whitespace chunk (spaCy's prefixes/suffixes, roughly).
_EDGE = re.escape(
    "…,:;!?¿؟¡()[]{}<>_#*&。？！，、；：～·।،۔؛٪'\"”“`‘´’‚„»«「」『』（）〔〕【】《》〈〉⟦⟧§%=$£€¥."
)
# Characters that split a word when inside it ("foo-bar", "/etc/fstab"), but not at its start.
_INFIX = re.escape("-/–—")
_BODY = rf"[^\s{_EDGE}{_INFIX}{_CJK}]+(?:[{_EDGE}]+[^\s{_EDGE}{_INFIX}{_CJK}]+)*"
TOKEN_PATTERN = re.compile(
    rf"""(?:https?|ftp)://[^\s<>"]*[^\s<>".,;:!?)\]'"]   # a URL is one token
    |{_BODY}                                          # a word, with inner punctuation ("3.5", "e.g")
    |[{_CJK}]                                         # one character of a script without spaces
    |(?<![^\s{_EDGE}])[{_INFIX}]+{_BODY}              # "/etc", "--force": infix chars leading a word
    |\.\.\.                                           # an ellipsis
    |\S                                               # any other single symbol
    """,
    re.VERBOSE,
)

# Languages written without spaces between words: words are characters there (Chinese, Japanese)
# or whitespace runs (Thai, Lao, Khmer, Burmese, Tibetan), so word-length bounds do not apply.
NO_SPACE_LANGUAGES = frozenset({"ja", "zh", "th", "lo", "km", "my", "bo"})

# Stop words per language. English is Gopher's list (Rae et al. 2021, "the, be, to, of, and, that,
# have, with"); the others are the most frequent function words of each language, playing the same
# role: a real sentence in that language contains at least two of them.
STOP_WORDS: dict[str, tuple[str, ...]] = {
    "en": ("the", "be", "to", "of", "and", "that", "have", "with"),
    "de": ("der", "die", "und", "in", "den", "von", "zu", "das", "mit", "ist"),
    "fr": ("de", "la", "le", "et", "les", "des", "en", "un", "du", "une"),
    "es": ("de", "la", "que", "el", "en", "y", "los", "del", "se", "las"),
    "it": ("di", "e", "il", "la", "che", "in", "per", "un", "del", "della"),
    "pt": ("de", "a", "o", "que", "e", "do", "da", "em", "um", "para"),
    "nl": ("de", "en", "van", "het", "een", "in", "is", "dat", "op", "te"),
    "ru": ("и", "в", "не", "на", "что", "с", "по", "как", "для", "это"),
    "pl": ("i", "w", "na", "z", "do", "nie", "się", "to", "że", "jest"),
    "ja": ("の", "に", "は", "を", "た", "が", "で", "て", "と", "し"),
    "zh": ("的", "了", "是", "在", "和", "有", "我", "不", "这", "中"),
}


def split_words(text: str) -> list[str]:
    """The tokens of one text: words, single punctuation marks, ellipses, URLs, CJK characters."""
    return TOKEN_PATTERN.findall(text)


def per_doc_sum(values: np.ndarray, doc: np.ndarray, n_docs: int) -> np.ndarray:
    """Sum of `values` per document, given the document index of every value."""
    return np.bincount(doc, weights=values, minlength=n_docs)


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """numerator / denominator, 0.0 where the denominator is 0."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.asarray(denominator, dtype=np.float64)
    out = np.zeros(len(numerator), dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def repeated_mask(keys: np.ndarray) -> np.ndarray:
    """True where `keys[i]` already occurred at an earlier index (it is not the first occurrence)."""
    mask = np.ones(len(keys), dtype=bool)
    if len(keys):
        mask[np.unique(keys, return_index=True)[1]] = False
    return mask


def hash_with_doc(doc: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """64-bit keys that are equal only for equal hashes in the same document."""
    return (doc.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15)) ^ hashes.astype(np.uint64)


@dataclass
class Tokens:
    """Every token of a partition, flat: `values[i]` belongs to document `doc[i]`."""

    values: pa.Array
    doc: np.ndarray
    counts: np.ndarray  # tokens per document
    starts: np.ndarray  # index of each document's first token

    @classmethod
    def of(cls, texts: list[str]) -> Tokens:
        per_doc = [TOKEN_PATTERN.findall(t) for t in texts]
        counts = np.fromiter((len(t) for t in per_doc), dtype=np.int64, count=len(per_doc))
        values = pa.array(list(chain.from_iterable(per_doc)), type=pa.string())
        doc = np.repeat(np.arange(len(texts), dtype=np.int64), counts)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        return cls(values, doc, counts, starts)

    @cached_property
    def lengths(self) -> np.ndarray:
        """Characters per token."""
        return pc.utf8_length(self.values).to_numpy(zero_copy_only=False).astype(np.int64)

    @cached_property
    def ids(self) -> np.ndarray:
        """An integer per distinct token string (equal strings, equal ids)."""
        encoded = pc.dictionary_encode(self.values)
        return encoded.indices.to_numpy(zero_copy_only=False).astype(np.uint64)

    @cached_property
    def is_word(self) -> np.ndarray:
        """Tokens with at least one character that is neither punctuation nor a symbol."""
        return pc.match_substring_regex(self.values, r"[^\pP\pS]").to_numpy(zero_copy_only=False)

    @cached_property
    def has_letter(self) -> np.ndarray:
        return pc.match_substring_regex(self.values, r"\pL").to_numpy(zero_copy_only=False)

    @property
    def position(self) -> np.ndarray:
        """Each token's position inside its document."""
        return np.arange(len(self.doc), dtype=np.int64) - self.starts[self.doc]


@dataclass
class Pieces:
    """Texts split into pieces (lines or paragraphs), flat: `values[i]` belongs to `doc[i]`."""

    values: pa.Array
    doc: np.ndarray

    @classmethod
    def split(cls, texts: pa.Array, pattern: str) -> Pieces:
        lists = pc.split_pattern_regex(texts, pattern)
        doc = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
        return cls(pc.list_flatten(lists), doc)

    def where(self, mask: np.ndarray) -> Pieces:
        return Pieces(self.values.filter(pa.array(mask)), self.doc[mask])

    @cached_property
    def lengths(self) -> np.ndarray:
        return pc.utf8_length(self.values).to_numpy(zero_copy_only=False).astype(np.int64)

    @cached_property
    def repeated(self) -> np.ndarray:
        """True for a piece equal to an earlier piece of the same document."""
        ids = pc.dictionary_encode(self.values).indices.to_numpy(zero_copy_only=False).astype(np.int64)
        return repeated_mask(self.doc * (int(ids.max(initial=0)) + 1) + ids)

    def test(self, result: pa.Array) -> np.ndarray:
        """A boolean Arrow result per piece as a numpy mask."""
        return result.to_numpy(zero_copy_only=False).astype(bool)


# Python's str.splitlines() boundaries, as a regex (what Gopher and C4 call lines).
LINE_BREAKS = r"\r\n|[\n\r\x0b\x0c\x1c\x1d\x1e\x85\x{2028}\x{2029}]"
