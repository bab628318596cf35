"""Language identification: which language a text is written in, and how sure the model is.

By default the model bundled with py3langid (142 classes, 140 labels: `sr` and `uz` come in two
scripts, and `zxx` means "no linguistic content"), which ships inside the package and runs offline. Its labels are reported in
gristmill's canonical form (`gristmill.pipeline.languages`): ISO 639-1 where the language has a
two-letter code (`en`, `ja`, `ki`), ISO 639-3 otherwise (`yue`, `wuu`, `ary`, `arz`). With a path to
a fastText model (`lid.176.bin` gives mostly ISO 639-1 codes, GlotLID codes such as `eng_Latn`) that
model is used instead, its labels as the model writes them (the filter stage compares codes in
canonical form, so both kinds match its `allow` list); it needs the optional package `fasttext`
(`pip install 'gristmill[fasttext]'`).

`identify(texts) -> [(lang, score), ...]`: one guess per text, in order; `score` is the model's
probability in [0, 1] for `lang`. A list rather than one text, so a model can score a whole file's
pages in a few vectorised calls. Models are loaded once per process.
"""

from __future__ import annotations

import functools
import importlib.util
import unicodedata
from collections.abc import Callable
from pathlib import Path

from gristmill.pipeline.languages import language_code

BUNDLED_MODEL = "py3langid"
FASTTEXT_LABEL_PREFIX = "__label__"

Identify = Callable[[list[str]], list[tuple[str, float]]]


def check_model(model_path: str | None) -> None:
    """Fail early, naming what is missing, when a fastText model cannot be used."""
    if model_path is None:
        return
    if importlib.util.find_spec("fasttext") is None:
        raise ValueError(
            f"langid_model {model_path!r} is a fastText model, which needs the package `fasttext`: "
            "pip install 'gristmill[fasttext]'"
        )
    if not Path(model_path).is_file():
        raise ValueError(f"langid_model {model_path!r}: no such file (a fastText .bin such as lid.176.bin)")


def model_name(model_path: str | None) -> str:
    """How stats and docs name the model in use."""
    return BUNDLED_MODEL if model_path is None else f"fasttext:{Path(model_path).name}"


@functools.lru_cache(maxsize=4)
def language_identifier(model_path: str | None = None) -> Identify:
    """The `identify` function of the bundled model, or of the fastText model at `model_path`."""
    if model_path is None:
        return _bundled_identifier()
    return _fasttext_identifier(model_path)


def _bundled_identifier() -> Identify:
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return ByteNgramNaiveBayes(LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)).classify


class ByteNgramNaiveBayes:
    """py3langid's model (naive Bayes over byte n-grams) scored with numpy: same features, same
    probabilities as its `classify`, about five times faster on a file's pages.

    py3langid finds the n-grams by walking an automaton one byte at a time in Python. No automaton
    state is more than `depth` bytes from the start, so the state after byte i depends only on the
    `depth` bytes ending at i, and all positions advance together in `depth` vectorised steps.
    Texts go in batches, joined by a byte that sends every state back to the start, so one text's
    n-grams never run into the next one's: a batch's n-grams are found and counted in a few numpy
    calls, then each text is scored with one product over its own n-grams, the same sum as for the
    text alone (a guess never depends on the batch). Keeps a float32 copy of the n-gram table
    (about 57 MB) for fast scoring.
    """

    # Bytes of text per batch: enough that numpy's per-call overhead vanishes, few enough that the
    # per-byte work arrays (8 bytes a byte) stay a few MB.
    BATCH_BYTES = 1 << 18

    def __init__(self, model) -> None:
        import numpy as np

        self.np = np
        self.labels = [language_code(label) for label in model.nb_classes]  # `kik` -> `ki`
        self.next_state = np.asarray(model.tk_nextmove)
        self.row_start = np.asarray(model.tk_row, dtype=np.int64) << 8
        self.feature_of_state = np.asarray(model.tk_output)
        self.log_p_feature = np.asarray(model.nb_ptc, dtype=np.float32)
        self.log_prior = np.asarray(model.nb_pc, dtype=np.float32)
        self.aliases: list[tuple[int, int]] = []  # (first column, later column) of a repeated label
        first: dict[str, int] = {}
        for column, label in enumerate(self.labels):
            if label in first:
                self.aliases.append((first[label], column))
            else:
                first[label] = column
        self.depth = self._automaton_depth()
        self.separator = self._reset_byte()

    def _automaton_depth(self) -> int:
        """Bytes from the start state to the deepest state (breadth-first over all 256 bytes)."""
        np = self.np
        seen = np.zeros(len(self.row_start), dtype=bool)
        frontier = np.array([0])
        seen[0] = True
        depth = 0
        while True:
            reached = self.next_state[(self.row_start[frontier][:, None] + np.arange(256)).ravel()]
            frontier = np.unique(reached[~seen[reached]])
            if not len(frontier):
                return depth
            seen[frontier] = True
            depth += 1

    def _reset_byte(self) -> bytes:
        """A byte that takes every state back to the start state, which emits no n-gram: the
        separator between the texts of a batch (a control byte for py3langid's model)."""
        np = self.np
        transitions = self.next_state.reshape(-1, 256)[np.unique(self.row_start >> 8)]
        resets = np.flatnonzero((transitions == 0).all(axis=0))
        if not len(resets) or self.feature_of_state[0] >= 0:
            raise ValueError("language model: no byte resets the n-gram automaton, so texts cannot be batched")
        return bytes([int(resets[0])])

    def classify(self, texts: list[str]) -> list[tuple[str, float]]:
        """(language, probability) of every text, in order."""
        results: list[tuple[str, float]] = []
        batch: list[bytes] = []
        size = 0
        for text in texts:
            if text.isupper():
                text = text.lower()
            batch.append(unicodedata.normalize("NFC", text).encode("utf-8", errors="surrogatepass"))
            size += len(batch[-1]) + 1
            if size >= self.BATCH_BYTES:
                results += self._classify_batch(batch)
                batch, size = [], 0
        if batch:
            results += self._classify_batch(batch)
        return results

    def _classify_batch(self, batch: list[bytes]):
        np = self.np
        n, d = len(batch), self.depth
        lengths = np.array([len(data) for data in batch], dtype=np.int64)
        # d - 1 separators in front give the first bytes of the batch a full window, from the start state.
        b = np.frombuffer(self.separator * (d - 1) + self.separator.join(batch), dtype=np.uint8)
        positions = len(b) - (d - 1)
        states = np.zeros(positions, dtype=np.int64)
        for k in range(d):
            states = self.next_state[self.row_start[states] + b[k : k + positions]]
        found = self.feature_of_state[states]
        text_of = np.repeat(np.arange(n), lengths + 1)[:positions]  # a separator counts to the text before it
        hit = found >= 0
        keys, counts = np.unique(text_of[hit] * len(self.log_p_feature) + found[hit], return_counts=True)
        texts, features = np.divmod(keys, len(self.log_p_feature))
        weights = np.log1p(counts.astype(np.float32))
        bounds = np.searchsorted(texts, np.arange(n + 1)).tolist()
        scores = np.zeros((n, len(self.labels)), dtype=np.float32)  # a text without n-grams: all zero
        for text, (start, end) in enumerate(zip(bounds, bounds[1:])):
            if end > start:
                scores[text] = weights[start:end] @ self.log_p_feature[features[start:end]] + self.log_prior
        # py3langid's temperature: calibrated across lengths
        scores *= (1.0 / np.sqrt(np.maximum(lengths, 1))).astype(np.float32)[:, None]
        scores = np.exp(scores - scores.max(axis=1, keepdims=True))
        scores /= scores.sum(axis=1, keepdims=True)
        for kept, alias in self.aliases:  # one label with two columns (a language in two scripts)
            scores[:, kept] += scores[:, alias]
            scores[:, alias] = 0.0
        best = scores.argmax(axis=1)
        return [(self.labels[column], float(score)) for column, score in zip(best, scores[np.arange(n), best])]


def _fasttext_identifier(model_path: str) -> Identify:
    check_model(model_path)
    import fasttext

    model = fasttext.load_model(model_path)

    def identify(texts: list[str]) -> list[tuple[str, float]]:
        labels, scores = model.predict([" ".join(text.split()) for text in texts], k=1)  # fastText reads lines
        return [(label[0].removeprefix(FASTTEXT_LABEL_PREFIX), min(1.0, float(score[0])))
                for label, score in zip(labels, scores)]

    return identify
