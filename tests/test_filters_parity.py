"""The filter stage removes what datatrove's filters remove, rule for rule, on real pages.

The pages are the bundled sample site, extracted to text with resiliparse (main content). The
reference is datatrove's chain GopherRepetition -> GopherQuality -> C4Quality -> FineWebQuality, and
a document's reason is the first rule that removed it in both.

Word splitting is where the two can differ, so it is tested two ways:
- datatrove given gristmill's word splitter (a datatrove WordTokenizer wrapping it): every rule's
  logic is then compared alone, and the counts must match exactly;
- datatrove with its own English tokenizer, spaCy's blank `en` model (runs offline; the NLTK
  tokenizers need punkt data that can't be downloaded here): counts per rule must agree within 3
  documents, and kept documents within 5 %.
"""

from __future__ import annotations

import re
from collections import Counter

import pyarrow as pa
from datatrove.data import Document
from datatrove.pipeline.filters import (
    C4QualityFilter,
    FineWebQualityFilter,
    GopherQualityFilter,
    GopherRepetitionFilter,
)
from datatrove.utils.word_tokenizers import WordTokenizer
from resiliparse.extract.html2text import extract_plain_text
from resiliparse.parse.encoding import bytes_to_str, detect_encoding

from gristmill import DATA_DIR
from gristmill.pipeline.filter.rules import _SENTENCE_END
from gristmill.pipeline.filter.stage import FilterConfig, filter_documents
from gristmill.pipeline.filter.text import split_words

SITE = DATA_DIR / "sample_site"
C4_END_PUNCTUATION = [".", "?", "!", '"', "'"]  # C4's own set, as datatrove uses it

DATATROVE_REASONS = {
    "gopher_short_doc": "doc_words", "gopher_long_doc": "doc_words",
    "gopher_below_avg_threshold": "mean_word_length", "gopher_above_avg_threshold": "mean_word_length",
    "gopher_too_many_hashes": "hash_ratio", "gopher_too_many_ellipsis": "ellipsis_ratio",
    "gopher_too_many_bullets": "bullet_lines", "gopher_too_many_end_ellipsis": "ellipsis_lines",
    "gopher_below_alpha_threshold": "alpha_words", "gopher_enough_stop_words": "stop_words",
}


class GristmillWords(WordTokenizer):
    """gristmill's word and sentence splitting, in datatrove's tokenizer interface."""

    def word_tokenize(self, text: str) -> list[str]:
        return split_words(text)

    def sent_tokenize(self, text: str) -> list[str]:
        raise NotImplementedError("datatrove's C4 filter only asks for spans")

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        ends = [m.end() for m in re.finditer(_SENTENCE_END, text)] or [len(text)]
        return [(start, end) for start, end in zip([0] + ends[:-1], ends)]


def extracted_pages(english_only: bool) -> list[tuple[str, str]]:
    pages = []
    for path in sorted(SITE.rglob("*.html")):
        relative = path.relative_to(SITE).as_posix()
        if english_only and relative.startswith("handbook/") and not relative.startswith("handbook/en-US/"):
            continue
        data = path.read_bytes()
        text = extract_plain_text(bytes_to_str(data, detect_encoding(data)), main_content=True)
        if text.strip():  # an empty page is a length rule's business, not these filters'
            pages.append((relative, text))
    return pages


def datatrove_reasons(pages: list[tuple[str, str]], language) -> list[str | None]:
    chain = [
        ("gopher_repetition", GopherRepetitionFilter(language=language)),
        ("gopher_quality", GopherQualityFilter(language=language)),
        ("c4", C4QualityFilter(language=language)),
        ("fineweb", FineWebQualityFilter(language=language)),
    ]
    reasons = []
    for name, text in pages:
        doc, reason = Document(text=text, id=name), None
        for family, step in chain:
            verdict = step.filter(doc)
            if verdict is not True:
                rule = verdict[1]
                rule = DATATROVE_REASONS.get(rule, re.sub(r"^duplicated_(\d+)_n_grams$", r"dup_\1_gram", rule))
                reason = f"{family}:{rule}"
                break
        reasons.append(reason)
    return reasons


def gristmill_reasons(pages: list[tuple[str, str]]) -> list[str | None]:
    table = pa.table({
        "id": [name for name, _ in pages],
        "url": [f"https://docs.example/{name}" for name, _ in pages],
        "text": [text for _, text in pages],
        "lang": ["en"] * len(pages),  # datatrove's filters judge every page as English
        "lang_score": pa.array([None] * len(pages), type=pa.float64()),
    })
    config = FilterConfig(
        type="filter", annotate_only=True, length={"enabled": False}, url={"enabled": False},
        language={"enabled": False}, c4={"end_punctuation": C4_END_PUNCTUATION},
    )
    return filter_documents(table, config).kept.column("filter_reason").to_pylist()


def test_same_word_splitting_gives_exactly_datatrove_removals_per_rule():
    pages = extracted_pages(english_only=False)
    ours = gristmill_reasons(pages)
    theirs = datatrove_reasons(pages, GristmillWords())
    assert Counter(ours) == Counter(theirs)
    assert ours == theirs  # and document by document
    assert sum(r is not None for r in ours) >= 20, "the sample should exercise the rules"


def test_removals_per_rule_match_datatrove_with_its_own_english_tokenizer():
    pages = extracted_pages(english_only=True)
    ours = Counter(gristmill_reasons(pages))
    theirs = Counter(datatrove_reasons(pages, "en"))
    kept_ours, kept_theirs = ours.pop(None, 0), theirs.pop(None, 0)
    assert abs(kept_ours - kept_theirs) <= 0.05 * len(pages), (ours, theirs)
    for rule in set(ours) | set(theirs):
        assert abs(ours[rule] - theirs[rule]) <= 3, (rule, ours, theirs)
