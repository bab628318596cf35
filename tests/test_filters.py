"""The filter stage's rules, one at a time, on small hand-made texts at both sides of each threshold.

Each test switches on a single rule (every other family off, every other threshold of the family
`null`) so a document's `reason` can only come from the rule under test.
"""

from __future__ import annotations

import math

import pyarrow as pa
import pytest
from pydantic import ValidationError

from gristmill.pipeline import io
from gristmill.pipeline.filter.rules import (
    C4Config,
    FineWebConfig,
    GopherQualityConfig,
    GopherRepetitionConfig,
)
from gristmill.pipeline.filter.stage import FilterConfig, filter_documents, finalize_filter_stats
from gristmill.pipeline.filter.text import split_words
from gristmill.pipeline.stage import merge_stats

FAMILIES = ("length", "url", "language", "gopher_repetition", "gopher_quality", "c4", "fineweb")
GOPHER_QUALITY_OFF = {name: None for name in GopherQualityConfig.model_fields if name not in ("enabled", "stop_words")}
GOPHER_REPETITION_OFF = {
    "dup_para_frac": None, "dup_para_char_frac": None, "dup_line_frac": None, "dup_line_char_frac": None,
    "top_n_grams": {}, "dup_n_grams": {},
}
C4_OFF = {
    "remove_citations": False, "filter_no_terminal_punct": False, "min_num_sentences": None,
    "min_words_per_line": None, "max_word_length": None, "filter_lorem_ipsum": False,
    "filter_javascript": False, "filter_curly_bracket": False, "filter_policy": False,
}
FINEWEB_OFF = {"line_punct_thr": None, "short_line_thr": None, "char_duplicates_ratio": None, "new_line_ratio": None}
FAMILY_OFF = {"gopher_quality": GOPHER_QUALITY_OFF, "gopher_repetition": GOPHER_REPETITION_OFF, "c4": C4_OFF,
              "fineweb": FINEWEB_OFF}


def documents(texts: list[str | None], langs: list[str | None] | None = None, scores=None, urls=None) -> pa.Table:
    n = len(texts)
    return pa.table(
        {
            "id": [f"doc-{i}" for i in range(n)],
            "url": urls or [f"https://example.org/{i}" for i in range(n)],
            "text": pa.array(texts, type=pa.string()),
            "source": ["test"] * n,
            "fetch_time": pa.array([None] * n, type=pa.timestamp("us", tz="UTC")),
            "lang": langs or ["en"] * n,
            "lang_score": pa.array(scores or [None] * n, type=pa.float64()),
        }
    )


def only(family: str, **settings) -> FilterConfig:
    """A config with one family on, holding only `settings` (its other rules off)."""
    families = {f: {"enabled": False} for f in FAMILIES}
    families[family] = {**FAMILY_OFF.get(family, {}), **settings}
    return FilterConfig(type="filter", **families)


def reasons(texts, config: FilterConfig, **columns) -> list[str | None]:
    """Each document's reason, in input order (None when kept)."""
    out = filter_documents(documents(texts, **columns), config)
    found = dict(zip(out.removed.column("id").to_pylist(), out.removed.column("reason").to_pylist()))
    assert out.kept.num_rows + out.removed.num_rows == len(texts)
    return [found.get(f"doc-{i}") for i in range(len(texts))]


def filler(count: int, start: int = 0) -> str:
    """`count` distinct three-letter-ish words that repeat nothing: w000 w001 ..."""
    return " ".join(f"w{i:03d}" for i in range(start, start + count))


# ----------------------------------------------------------------------------------- words


def test_split_words_separates_punctuation_keeps_urls_and_splits_cjk_characters():
    assert split_words('He said: "stop!" (twice)...') == ["He", "said", ":", '"', "stop", "!", '"', "(", "twice", ")", "..."]
    assert split_words("version 3.5 of foo-bar in /etc/fstab") == [
        "version", "3.5", "of", "foo", "-", "bar", "in", "/etc", "/", "fstab"]
    assert split_words("see https://example.org/a?b=c.") == ["see", "https://example.org/a?b=c", "."]
    assert split_words("これはペンです。") == ["こ", "れ", "は", "ペ", "ン", "で", "す", "。"]


# ------------------------------------------------------------------------------ gopher quality


def test_gopher_doc_words_bounds():
    config = only("gopher_quality", min_doc_words=50, max_doc_words=60)
    texts = ["word " * 50, "word " * 49, "word " * 60, "word " * 61, "word , " * 50]
    assert reasons(texts, config) == [None, "gopher_quality:doc_words", None, "gopher_quality:doc_words", None]


def test_gopher_mean_word_length_bounds():
    config = only("gopher_quality", min_avg_word_length=3, max_avg_word_length=10)
    texts = ["abc " * 20, "ab " * 20, "abcdefghij " * 20, "abcdefghijk " * 20]
    expected = [None, "gopher_quality:mean_word_length", None, "gopher_quality:mean_word_length"]
    assert reasons(texts, config) == expected


def test_gopher_mean_word_length_is_not_judged_for_languages_without_spaces():
    config = only("gopher_quality", min_avg_word_length=3)
    assert reasons(["これはペンです。" * 20, "ab " * 20], config, langs=["ja", "en"]) == [
        None, "gopher_quality:mean_word_length"]


@pytest.mark.parametrize("symbol, rule", [("#", "hash_ratio"), ("...", "ellipsis_ratio"), ("…", "ellipsis_ratio")])
def test_gopher_symbol_to_word_ratio(symbol, rule):
    # tokens: "tag", the symbol, k words -> ratio 1 / (k + 2); 0.1 holds at k = 8
    config = only("gopher_quality", max_symbol_word_ratio=0.1)
    texts = [f"tag{symbol} {filler(8)}", f"tag{symbol} {filler(7)}"]
    assert reasons(texts, config) == [None, f"gopher_quality:{rule}"]


def test_gopher_bullet_lines_ratio():
    config = only("gopher_quality", max_bullet_lines_ratio=0.9)
    nine_of_ten = "\n".join(["- item"] * 9 + ["plain line"])
    all_bullets = "\n".join(["• item"] * 5 + ["  - item"] * 5)
    assert reasons([nine_of_ten, all_bullets], config) == [None, "gopher_quality:bullet_lines"]


def test_gopher_ellipsis_lines_ratio():
    config = only("gopher_quality", max_ellipsis_lines_ratio=0.3)
    three = "\n".join(["and then..."] * 3 + ["a line"] * 7)
    four = "\n".join(["and then…"] * 4 + ["a line"] * 6)
    assert reasons([three, four], config) == [None, "gopher_quality:ellipsis_lines"]


def test_gopher_alpha_words_ratio():
    config = only("gopher_quality", min_alpha_words_ratio=0.8)
    texts = ["word " * 8 + "123 " * 2, "word " * 7 + "123 " * 3, "word , " * 5]
    assert reasons(texts, config) == [None, "gopher_quality:alpha_words", "gopher_quality:alpha_words"]


def test_gopher_stop_words_per_language_and_case_sensitive_as_gopher():
    config = only("gopher_quality", min_stop_words=2)
    texts = ["the cat of mine", "the cat sat", "The cat Of mine", "der Hund und die Katze", "猫の手を借りる", "kot i pies"]
    langs = ["en", "en", "en", "de", "ja", "xx"]
    expected = [None, "gopher_quality:stop_words", "gopher_quality:stop_words", None, None, None]
    assert reasons(texts, config, langs=langs) == expected


def test_gopher_stop_words_can_be_replaced_per_language():
    config = only("gopher_quality", min_stop_words=2, stop_words={"en": ["cat", "sat"]})
    assert reasons(["the cat sat", "the of and"], config) == [None, "gopher_quality:stop_words"]


# --------------------------------------------------------------------------- gopher repetition


@pytest.mark.parametrize("separator, rule", [("\n\n", "dup_para_frac"), ("\n", "dup_line_frac")])
def test_gopher_duplicate_piece_fraction(separator, rule):
    # 10 pieces of which 3 (then 4) repeat an earlier one: 0.3 is allowed, 0.4 is not
    config = only("gopher_repetition", **{rule: 0.3})
    three = separator.join(["same piece"] * 4 + [f"piece {i}" for i in range(6)])
    four = separator.join(["same piece"] * 5 + [f"piece {i}" for i in range(5)])
    assert reasons([three, four], config) == [None, f"gopher_repetition:{rule}"]


@pytest.mark.parametrize("separator, rule", [("\n\n", "dup_para_char_frac"), ("\n", "dup_line_char_frac")])
def test_gopher_duplicate_piece_character_fraction(separator, rule):
    # repeated piece of 20 characters in a text of 2 * 20 + len(separators) + n characters
    config = only("gopher_repetition", **{rule: 0.2})
    piece = "x" * 20

    def text(n: int) -> str:
        return separator.join([piece, piece, "y" * n])

    at_threshold = next(n for n in range(200) if 20 / len(text(n)) <= 0.2)
    assert reasons([text(at_threshold), text(at_threshold - 1)], config) == [None, f"gopher_repetition:{rule}"]


@pytest.mark.parametrize("n, threshold", [(2, 0.2), (3, 0.18), (4, 0.16)])
def test_gopher_top_ngram_character_fraction(n, threshold):
    # one n-gram of n two-letter words seen twice: 2 * (3n - 1) characters; unique filler after it
    config = only("gopher_repetition", top_n_grams={n: threshold})
    gram = " ".join(["aa", "bb", "cc", "dd"][:n])
    top_chars = 2 * len(gram)

    def text(m: int) -> str:
        return f"{gram} {gram} {filler(m)}"

    m = next(m for m in range(1, 200) if top_chars / len(text(m)) <= threshold)
    assert reasons([text(m), text(m - 1)], config) == [None, f"gopher_repetition:top_{n}_gram"]


@pytest.mark.parametrize("n, threshold", [(5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)])
def test_gopher_duplicated_ngram_character_fraction(n, threshold):
    # a run of n words repeated once: the repeat's characters (2 per word) count
    config = only("gopher_repetition", dup_n_grams={n: threshold})
    run = " ".join(chr(ord("a") + i) * 2 for i in range(n))

    def text(m: int) -> str:
        return f"{run} {run} {filler(m)}"

    m = next(m for m in range(1, 400) if 2 * n / len(text(m)) <= threshold)
    assert reasons([text(m), text(m - 1)], config) == [None, f"gopher_repetition:dup_{n}_gram"]


def test_duplicated_ngrams_jump_past_each_repeat_like_the_reference():
    # "a a a a a a" with n = 2: the scan counts (2,3) and (4,5) but not the overlapping pairs
    config = only("gopher_repetition", dup_n_grams={2: 1.0})
    out = filter_documents(documents(["aa aa aa aa aa aa"]), config)
    assert out.kept.column("gopher_dup_2_gram_char_frac")[0].as_py() == pytest.approx(8 / 17)


# -------------------------------------------------------------------------------------------- C4


def c4_text(out) -> list[str]:
    return out.kept.column("text").to_pylist()


def test_c4_keeps_only_lines_ending_in_terminal_punctuation_and_rewrites_the_text():
    config = only("c4", filter_no_terminal_punct=True)
    out = filter_documents(documents(["First line is fine.\nno punctuation here\nIs this a question?\nends...\n"]), config)
    assert c4_text(out) == ["First line is fine.\nIs this a question?"]
    assert out.stats["c4"]["lines_removed"]["no_terminal_punct"] == 3  # includes the empty last line
    assert out.stats["c4"]["docs_rewritten"] == 1
    assert out.kept.column("c4_chars_removed")[0].as_py() == len("\nno punctuation here\nends...\n")


def test_c4_min_words_per_line_and_max_word_length():
    config = only("c4", min_words_per_line=3, max_word_length=10)
    text = "Two words.\nThree words here.\n" + "a" * 10 + " is fine.\n" + "a" * 11 + " is too long."
    out = filter_documents(documents([text]), config)
    assert c4_text(out) == ["Three words here.\n" + "a" * 10 + " is fine."]
    assert out.stats["c4"]["lines_removed"] == {"too_long_word": 1, "too_few_words": 1}


def test_c4_drops_javascript_and_policy_lines():
    config = only("c4", filter_javascript=True, filter_policy=True)
    text = "Please enable JavaScript to continue.\nThis site uses cookies for analytics.\nA real sentence."
    assert c4_text(filter_documents(documents([text]), config)) == ["A real sentence."]


def test_c4_removes_citations_before_checking_the_line_end():
    config = only("c4", remove_citations=True, filter_no_terminal_punct=True)
    out = filter_documents(documents(["A cited claim.[1]\nAnother one.[citation needed]"]), config)
    assert c4_text(out) == ["A cited claim.\nAnother one."]


def test_c4_lorem_ipsum_and_curly_bracket_remove_the_page_only_from_lines_that_survive():
    config = only("c4", filter_no_terminal_punct=True, filter_lorem_ipsum=True, filter_curly_bracket=True)
    texts = [
        "Lorem ipsum dolor sit amet.",
        "Use a dict like {'a': 1}.",
        "lorem ipsum without an end\nif (x) { y }\nA fine line.",
        "Use {x} first.\nLorem ipsum later.",
    ]
    assert reasons(texts, config) == ["c4:lorem_ipsum", "c4:curly_bracket", None, "c4:curly_bracket"]


def test_c4_min_num_sentences():
    config = only("c4", min_num_sentences=5)
    five = "One. Two! Three?\nFour. Five."
    four = "One. Two! Three?\nFour."
    assert reasons([five, four], config) == [None, "c4:too_few_sentences"]


def test_c4_full_width_stops_keep_japanese_lines():
    japanese = "これは日本語の文です。\nもう一つの文があります。\n" * 3
    out = filter_documents(documents([japanese], langs=["ja"]), FilterConfig(type="filter", **{
        f: {"enabled": False} for f in FAMILIES if f != "c4"}))
    assert out.removed.num_rows == 0
    assert out.kept.column("c4_sentences")[0].as_py() == 6


# --------------------------------------------------------------------------------------- FineWeb


def test_fineweb_line_punctuation_ratio():
    config = only("fineweb", line_punct_thr=0.12)
    three = "\n".join(["Ends well."] * 3 + ["no end"] * 22)
    two = "\n".join(["Ends well."] * 2 + ["no end"] * 23)
    assert reasons([three, two, "\n \n"], config) == [None, "fineweb:line_punct_ratio", "fineweb:empty"]


def test_fineweb_short_line_ratio():
    config = only("fineweb", short_line_thr=0.67, short_line_length=30)
    long_line = "x" * 31
    assert reasons(["short\nshort\n" + long_line, "short\nshort\nshort\n" + long_line], config) == [
        None, "fineweb:short_line_ratio"]


def test_fineweb_duplicated_line_characters():
    # "abcde" twice: 5 duplicated characters of 10 + n non-newline characters
    config = only("fineweb", char_duplicates_ratio=0.01)
    n = next(n for n in range(1000) if 5 / (10 + n) <= 0.01)
    texts = [f"abcde\nabcde\n{'z' * n}", f"abcde\nabcde\n{'z' * (n - 1)}"]
    assert reasons(texts, config) == [None, "fineweb:char_dup_ratio"]


def test_fineweb_list_ratio():
    config = only("fineweb", new_line_ratio=0.3)
    three_newlines = "a b c\nd e f\ng h\ni j"  # 3 newlines / 10 words
    four_newlines = "a b c\nd e\nf\ng h\ni j"  # 4 / 10
    assert reasons([three_newlines, four_newlines], config) == [None, "fineweb:list_ratio"]


def test_fineweb_measures_the_text_after_c4_line_filtering():
    # without C4 the menu lines make the page short-lined; C4 drops them before FineWeb looks
    menu = "\n".join(["Home", "About", "Blog", "Contact"] * 3)
    body = "\n".join(f"This is a complete sentence number {i} of the body." for i in range(3))
    text = menu + "\n" + body
    fineweb = {**FINEWEB_OFF, "short_line_thr": 0.67}
    without_c4 = FilterConfig(type="filter", **{f: {"enabled": False} for f in FAMILIES if f != "fineweb"},
                              fineweb=fineweb)
    with_c4 = FilterConfig(type="filter", **{f: {"enabled": False} for f in FAMILIES if f not in ("fineweb", "c4")},
                           fineweb=fineweb, c4={**C4_OFF, "filter_no_terminal_punct": True})
    assert reasons([text], without_c4) == ["fineweb:short_line_ratio"]
    assert reasons([text], with_c4) == [None]


# ------------------------------------------------------------------------- length, language, url


def test_length_bounds():
    config = only("length", min_chars=5, max_chars=10)
    assert reasons(["12345", "1234", "1234567890", "12345678901"], config) == [
        None, "length:too_short", None, "length:too_long"]


def test_language_allow_list_and_min_score():
    config = only("language", allow=["en", "de"], min_score=0.65)
    texts = ["a", "b", "c", "d", "e"]
    langs = ["en", "fr", "de", "en", "en"]
    scores = [0.9, 0.99, 0.65, 0.64, None]
    assert reasons(texts, config, langs=langs, scores=scores) == [
        None, "language:not_allowed", None, "language:low_score", None]


def test_language_allow_list_accepts_iso_639_1_and_639_3_codes():
    config = only("language", allow=["eng", "de-DE", "yue", "kik"], min_score=None)
    langs = ["en", "eng_Latn", "de", "deu", "yue", "ki", "fr", "fra", "wuu"]
    assert reasons(["x"] * len(langs), config, langs=langs) == [None] * 6 + ["language:not_allowed"] * 3


def test_gopher_repetition_ignores_blank_and_whitespace_only_lines():
    config = only("gopher_repetition", dup_line_frac=0.3, dup_para_frac=0.3)
    distinct = [f"line {filler(5, 10 * i)}" for i in range(6)]
    spaced = "\n\t\n".join(distinct) + "\n \n"  # tab-only and space-only lines between every line
    out = filter_documents(documents([spaced]), config)
    assert out.kept.num_rows == 1
    assert out.kept.column("gopher_dup_line_frac").to_pylist() == [0.0]
    assert out.kept.column("gopher_dup_para_frac").to_pylist() == [0.0]


def test_url_block_list_by_domain_file_and_word(tmp_path):
    blocklist = tmp_path / "domains.txt"
    blocklist.write_text("# adult sites\nblocked.example\n")
    config = only("url", blocked_domains=["spam.test"], blocked_domains_file=str(blocklist), blocked_words=["casino"])
    urls = ["https://blocked.example/a", "http://www.spam.test/x", "https://notspam.test/", "https://ok.org/Casino-night",
            "https://ok.org/page", None]
    assert reasons(["t"] * 6, config, urls=urls) == [
        "url:blocked_domain", "url:blocked_domain", None, "url:blocked_word", None, None]


def test_url_block_list_file_that_does_not_exist_is_named(tmp_path):
    config = only("url", blocked_domains_file=str(tmp_path / "missing.txt"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        filter_documents(documents(["t"]), config)


# ------------------------------------------------------------------------------------ the stage


def test_reason_names_the_first_failed_rule_and_signals_are_kept_on_removed_documents():
    config = FilterConfig(type="filter")
    out = filter_documents(documents(["short", "x " * 100]), config)
    # "x x x ...": its top 2-gram covers more than 20 % of it, and it has 100 words of 1 letter
    assert out.removed.column("reason").to_pylist() == ["gopher_quality:doc_words", "gopher_repetition:top_2_gram"]
    removed = out.removed.to_pylist()
    for row in removed:
        assert row["gopher_words"] is not None and row["fineweb_list_ratio"] is not None


def test_missing_text_is_removed_with_its_reason():
    out = filter_documents(documents([None, "x"]), FilterConfig(type="filter"))
    assert out.removed.column("reason").to_pylist()[0] == "filter:missing_text"
    assert out.kept.num_rows + out.removed.num_rows == 2


def test_annotate_only_removes_nothing_and_leaves_text_as_is():
    texts = ["short", "A line without an end\nA complete sentence here."]
    out = filter_documents(documents(texts), FilterConfig(type="filter", annotate_only=True))
    assert out.removed.num_rows == 0
    assert out.kept.column("text").to_pylist() == texts
    assert out.kept.column("filter_reason").to_pylist()[0] == "gopher_quality:doc_words"
    assert "reason" in out.removed.column_names


def test_disabled_family_adds_no_columns_and_removes_nothing():
    config = FilterConfig(type="filter", **{f: {"enabled": False} for f in FAMILIES})
    out = filter_documents(documents(["a", "b"]), config)
    assert out.kept.num_rows == 2 and out.kept.column_names == io.DOCUMENT_SCHEMA.names


def test_unknown_setting_is_an_error_naming_the_key():
    with pytest.raises(ValidationError, match="min_words"):
        FilterConfig(type="filter", gopher_quality={"min_words": 5})
    with pytest.raises(ValidationError, match="fineweb"):
        FilterConfig(type="filter", fineweb={"short_line_thr": "lots"})


def test_stats_histograms_add_up_across_parts_and_carry_thresholds():
    config = FilterConfig(type="filter")
    first = filter_documents(documents(["word " * 60, "short"]), config).stats
    second = filter_documents(documents(["more words here. " * 20]), config).stats
    merged = finalize_filter_stats(merge_stats([first, second]), config)
    words = merged["histograms"]["gopher_words"]
    assert sum(words["counts"]) == 3 and len(words["edges"]) == len(words["counts"]) + 1
    ratios = merged["histograms"]["gopher_alpha_words_ratio"]
    assert all(math.isclose(a, b) for a, b in zip(ratios["edges"], [0.05 * i for i in range(21)]))
    assert merged["thresholds"]["gopher_words"] == {"min": 50, "max": 100_000}
    assert merged["thresholds"]["fineweb_line_punct_ratio"] == {"min": 0.12}
    assert merged["settings"]["gopher_repetition"]["dup_n_grams"]["10"] == 0.1
    assert merged["removed_by_rule"]["gopher_quality:doc_words"] == 1
    assert merged["annotate_only"] is False


def test_default_thresholds_are_the_published_ones():
    quality, repetition, c4, fineweb = GopherQualityConfig(), GopherRepetitionConfig(), C4Config(), FineWebConfig()
    assert (quality.min_doc_words, quality.max_doc_words, quality.min_avg_word_length, quality.max_avg_word_length,
            quality.max_symbol_word_ratio, quality.max_bullet_lines_ratio, quality.max_ellipsis_lines_ratio,
            quality.min_alpha_words_ratio, quality.min_stop_words) == (50, 100_000, 3, 10, 0.1, 0.9, 0.3, 0.8, 2)
    assert repetition.top_n_grams == {2: 0.2, 3: 0.18, 4: 0.16}
    assert repetition.dup_n_grams == {5: 0.15, 6: 0.14, 7: 0.13, 8: 0.12, 9: 0.11, 10: 0.10}
    assert (c4.min_num_sentences, c4.min_words_per_line, c4.max_word_length) == (5, 3, 1000)
    assert (fineweb.line_punct_thr, fineweb.short_line_thr, fineweb.char_duplicates_ratio,
            fineweb.new_line_ratio) == (0.12, 0.67, 0.01, 0.3)
