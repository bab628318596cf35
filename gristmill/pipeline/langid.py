"""Language identification: which language a text is written in, and how sure the model is.

By default the model bundled with py3langid (97 languages, ISO 639-1 codes such as `en`, `ja`),
which ships inside the package and runs offline. With a path to a fastText model (`lid.176.bin`
gives ISO 639-1 codes, GlotLID gives codes such as `eng_Latn`) that model is used instead; it
needs the optional package `fasttext` (`pip install 'gristmill[fasttext]'`).

`identify(text) -> (lang, score)`: `score` is the model's probability in [0, 1] for `lang`.
Models are loaded once per process.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import unicodedata
from collections.abc import Callable
from pathlib import Path

BUNDLED_MODEL = "py3langid"
FASTTEXT_LABEL_PREFIX = "__label__"

Identify = Callable[[str], tuple[str, float]]


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
    probabilities as its `classify`, about three times faster.

    py3langid finds the n-grams by walking an automaton one byte at a time in Python. No automaton
    state is more than `depth` bytes from the start, so the state after byte i depends only on the
    `depth` bytes ending at i, and all positions advance together in `depth` vectorised steps.
    Keeps a float32 copy of the n-gram table (about 57 MB) for fast scoring.
    """

    def __init__(self, model) -> None:
        import numpy as np

        self.np = np
        self.labels = list(model.nb_classes)
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

    def features(self, data: bytes):
        """(feature ids, counts) of the byte n-grams in `data`."""
        np = self.np
        b = np.frombuffer(data, dtype=np.uint8)
        n, d = len(b), self.depth
        head, state = [], 0
        for byte in data[: d - 1]:  # the first positions see fewer than `depth` bytes
            state = self.next_state[self.row_start[state] + byte]
            head.append(state)
        states = np.zeros(max(0, n - d + 1), dtype=np.int64)
        for back in range(d - 1, -1, -1):
            states = self.next_state[self.row_start[states] + b[d - 1 - back : n - back]]
        found = self.feature_of_state[np.concatenate([np.asarray(head, dtype=np.int64), states])]
        return np.unique(found[found >= 0], return_counts=True)

    def classify(self, text: str) -> tuple[str, float]:
        np = self.np
        if text.isupper():
            text = text.lower()
        data = unicodedata.normalize("NFC", text).encode("utf-8", errors="surrogatepass")
        ids, counts = self.features(data)
        if len(ids):
            scores = np.log1p(counts.astype(np.float32)) @ self.log_p_feature[ids] + self.log_prior
        else:
            scores = np.zeros(len(self.labels), dtype=np.float32)
        scores *= 1.0 / math.sqrt(len(data) or 1)  # py3langid's temperature: calibrated across lengths
        scores = np.exp(scores - scores.max())
        scores /= scores.sum()
        for kept, alias in self.aliases:  # one label with two columns (a language in two scripts)
            scores[kept] += scores[alias]
            scores[alias] = 0.0
        best = int(scores.argmax())
        return self.labels[best], float(scores[best])


def _fasttext_identifier(model_path: str) -> Identify:
    check_model(model_path)
    import fasttext

    model = fasttext.load_model(model_path)

    def identify(text: str) -> tuple[str, float]:
        labels, scores = model.predict(" ".join(text.split()), k=1)  # fastText reads one line
        return labels[0].removeprefix(FASTTEXT_LABEL_PREFIX), min(1.0, float(scores[0]))

    return identify
