"""Language codes: one spelling per language, so `en`, `eng`, `en-US` and `eng_Latn` compare equal.

gristmill's canonical code is ISO 639-1 (two letters) where the language has one, ISO 639-3 (three
letters) otherwise: `en`, `de`, `ki` (not `kik`), but `yue`, `wuu`, `arz`, `ary`. The region or
script after `-` or `_` is dropped. ISO 639-3 codes are looked up in pycountry's ISO 639-3 table.
"""

from __future__ import annotations

import functools
import re

import pycountry


@functools.lru_cache(maxsize=4096)
def language_code(lang: str | None) -> str:
    """The canonical code of `lang` (`en` from `en`, `EN-us`, `eng`, `eng_Latn`); "" when missing."""
    if not lang or not lang.strip():
        return ""
    code = re.split(r"[-_]", lang.strip().lower(), maxsplit=1)[0]
    if len(code) == 3:
        language = pycountry.languages.get(alpha_3=code)
        if language is not None and hasattr(language, "alpha_2"):
            return language.alpha_2
    return code
