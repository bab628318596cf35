"""Finding personal data and secrets in text: one combined regex pass, then a validator per type.

The combined pattern has one named group per candidate kind. A candidate only counts once its
validator accepts it (Luhn and IIN ranges for cards, mod-97 and the country's length for IBANs,
`phonenumbers` for phones, `ipaddress` for IPs, base64 JSON with `alg` for JWTs, ...), so version
numbers, dates, ISBNs, UUIDs, hashes and numeric tables fall out at validation. Spans are Python
string offsets (code points) into the text that was scanned.
"""

from __future__ import annotations

import base64
import binascii
import functools
import ipaddress
import json
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

import phonenumbers

# Every type this module can report, in the order the stage lists them.
STRUCTURED_TYPES = (
    "email",
    "phone",
    "ip_address",
    "payment_card",
    "iban",
    "us_ssn",
    "aws_access_key",
    "github_token",
    "gitlab_token",
    "slack_token",
    "stripe_key",
    "private_key",
    "jwt",
    "url_password",
)
NAME_TYPE = "person"
ALL_TYPES = (*STRUCTURED_TYPES, NAME_TYPE)

# RFC 2606 / RFC 6761 reserved names, RFC 5737 (IPv4) and RFC 3849 (IPv6) documentation ranges.
DEFAULT_ALLOWED_EMAIL_DOMAINS = ("example.com", "example.org", "example.net", "example", "test", "invalid", "localhost")
DEFAULT_ALLOWED_EMAIL_LOCAL_PARTS = ("noreply", "no-reply", "donotreply", "do-not-reply")
DEFAULT_ALLOWED_NETWORKS = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24", "2001:db8::/32")
# Values published as examples in vendors' documentation: never anyone's secret.
DEFAULT_ALLOWED_VALUES = ("AKIAIOSFODNN7EXAMPLE", "ASIAIOSFODNN7EXAMPLE")

# Placeholders people write for the password part of a URL in documentation, in the languages
# manuals are written in (`smb://utilisateur:motdepasse@serveur/`, `usuário:senha@servidor`).
# Compared after lower-casing and dropping `_-. ` and a possessive (`your_password`, `votre-mdp`).
PASSWORD_WORDS = frozenset(
    {"password", "passwd", "pass", "pwd", "pw", "secret", "mysecretpassword", "changeme", "passphrase",
     "motdepasse", "mdp",  # fr
     "passwort", "kennwort", "geheim",  # de
     "contraseña", "contrasena", "clave", "senha", "palavrapasse",  # es, pt
     "parolachiave", "parolasegreta",  # it
     "wachtwoord",  # nl
     "hasło", "haslo", "heslo", "jelszó", "jelszo", "parolă", "parola", "salasana", "lösenord", "losenord",
     "adgangskode", "passord", "şifre", "sifre", "пароль", "parol", "密码", "密碼", "パスワード", "비밀번호"}
)
PASSWORD_POSSESSIVES = ("my", "your", "the", "some", "mon", "ton", "votre", "notre", "mein", "dein", "ihr",
                        "tu", "su", "mi", "sua", "seu", "minha", "teu", "tua", "il", "la", "tuo", "mio", "je", "uw")
_PLACEHOLDER_FILLER = frozenset({"xxx", "xxxx", "xxxxx", "xxxxxx", "xxxxxxxx", "***", "****", "******", "...", "…"})
# `name@2x.png` is an image, not an address: top-level "domains" that are file extensions.
FILE_EXTENSION_TLDS = frozenset(
    {"png", "jpg", "jpeg", "gif", "svg", "webp", "bmp", "ico", "css", "js", "ts", "json", "html", "htm",
     "txt", "md", "py", "rb", "go", "rs", "java", "php", "xml", "yaml", "yml", "zip", "gz", "tar", "pdf"}
)
# IBAN lengths per country (SWIFT IBAN registry).
IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27,
    "BR": 29, "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28,
    "EE": 20, "EG": 29, "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23,
    "GL": 18, "GR": 27, "GT": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27,
    "JO": 30, "KW": 30, "KZ": 20, "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25,
    "MC": 27, "MD": 24, "ME": 22, "MK": 19, "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18,
    "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29, "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33,
    "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24, "SM": 27, "SO": 23, "ST": 25, "SV": 28,
    "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20, "YE": 30,
}
# Regions to read national-format phone numbers in, by the document's language, when a document
# has one; otherwise the configured default region applies.
PHONE_REGION_BY_LANG = {
    "de": "DE", "fr": "FR", "es": "ES", "it": "IT", "nl": "NL", "pt": "BR", "ja": "JP", "zh": "CN",
    "ru": "RU", "pl": "PL", "sv": "SE", "da": "DK", "fi": "FI", "nb": "NO", "no": "NO", "cs": "CZ",
    "ko": "KR", "tr": "TR", "el": "GR", "hu": "HU", "ro": "RO", "uk": "UA",
}

_HEX = "[0-9A-Fa-f]"
# The candidate kinds. Most can only begin at the start of a word, so they sit behind one `\b`:
# a position inside a word is rejected by a single test. Each alternative begins with a literal or
# a character class (look-behinds come after the first character) and is named by an empty group
# at its end, which `match.lastgroup` reports: that lets the regex engine skip an alternative after
# one character comparison instead of entering it, which is what keeps one pass over many kinds fast.
# Groups of digits joined by one separator each (`030 1234567`, `(415) 555-2671`, `4111-1111-...`):
# two separators in a row end the candidate, so a number never swallows the text around it. The
# look-ahead wants seven digits in such groups before anything else is tried.
_DIGIT_SEPARATOR = r"(?:[ \u00a0\-./]|\)[ \u00a0\-]?|[ \u00a0]?\()"
_DIGIT_GROUPS = rf"(?=(?:{_DIGIT_SEPARATOR}?\d){{6}})\d{{0,18}}(?:{_DIGIT_SEPARATOR}\d{{1,18}}){{0,8}}(?!\w|[.,/\-]\d)"
_WORD_START_CANDIDATES = {
    "jwt": r"eyJ(?<![\w-]eyJ)[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*",
    "aws_access_key": r"A(?:KIA|SIA|BIA|CCA)[A-Z2-7]{16}(?![A-Za-z0-9])",
    "github_token": r"g(?:h[pousr]_[A-Za-z0-9]{36}|ithub_pat_[A-Za-z0-9]{22}_[A-Za-z0-9]{59})(?![A-Za-z0-9_])",
    "gitlab_token": r"gl(?<!-g)(?:pat|dt|ptt|rt|cbt|soat|ffct|oas)-[A-Za-z0-9_-]{20,64}(?![A-Za-z0-9_-])",
    "slack_token": r"xox(?<!-x)[abposer]-(?:[A-Za-z0-9]{1,40}-){1,4}[A-Za-z0-9]{6,64}(?![A-Za-z0-9_-])",
    "slack_webhook": r"https://hooks\.slack\.com/services/T[A-Z0-9]{6,12}/B[A-Z0-9]{6,12}/[A-Za-z0-9]{20,32}"
                     r"(?![A-Za-z0-9_-])",
    "stripe_key": r"[sr]k_(?:live|test)_[A-Za-z0-9]{16,247}(?![A-Za-z0-9_])",
    "iban": r"[A-Z][A-Z]\d\d(?:[ \u00a0]?[A-Z0-9]){11,30}",
    # `client=81.2.69.160` is an address (server logs); `pkg==3.1.1.3`, `>=`, `~=` pin versions
    "ipv4": r"\d(?<![.\-/]\d)(?<![=<>!~]=\d)\d{0,2}(?:\.\d{1,3}){3}(?!\w|\.\w)",
    # phones, payment cards and SSNs look alike: one candidate, told apart by the validators
    "number": r"\d(?<![.+\-/,]\d)" + _DIGIT_GROUPS,
    "ipv6": rf"[0-9A-Fa-f](?<![:.][0-9A-Fa-f]){_HEX}{{0,3}}(?::{_HEX}{{0,4}}){{2,7}}(?![\w:])",
    "email": r"[^\W](?<![.%+\-]\w)[\w.%+\-]{0,63}@(?:[^\W_](?:[\w\-]{0,61}[^\W_])?\.)+[A-Za-z]{2,24}"
             r"(?![\w\-])",
}
_PUNCTUATION_START_CANDIDATES = {
    "private_key": r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----(?:[^-]|-(?!----)){1,16384}?"
                   r"-----END (?:[A-Z0-9]+ )*PRIVATE KEY(?: BLOCK)?-----",
    "url_password": r"://[^\s:/@?#\[\]\"'<>]{1,64}:(?P<password>[^\s:/@?#\"'<>]{1,128})@(?=[A-Za-z0-9\[])",
    "number_international": r"\+(?<![\w.+\-/,]\+)[ \u00a0]?\(?\d" + _DIGIT_GROUPS,
    "number_area_code": r"\((?<![\w.+\-/,]\()(?=\d{1,5}\))\d" + _DIGIT_GROUPS,
}


def _alternatives(candidates: dict[str, str]) -> str:
    return "|".join(f"{pattern}(?P<{name}>)" for name, pattern in candidates.items())


_NUMBER_KINDS = frozenset({"number", "number_international", "number_area_code"})
def _candidate_pattern(word_start: dict[str, str]) -> re.Pattern:
    return re.compile(r"\b(?:" + _alternatives(word_start) + ")|" + _alternatives(_PUNCTUATION_START_CANDIDATES))


CANDIDATE_PATTERN = _candidate_pattern(_WORD_START_CANDIDATES)
# The e-mail alternative scans every word up to its end looking for an `@`; a document without
# one (most pages) is scanned with the same pattern minus that alternative, about a third faster.
_CANDIDATE_PATTERN_NO_EMAIL = _candidate_pattern({k: v for k, v in _WORD_START_CANDIDATES.items() if k != "email"})

_NON_DIGIT = re.compile(r"\D")
_SPACE_OR_DOT = re.compile(r"[ .]")
_SPACE_OR_DASH = re.compile(r"[ \-]")
# a date standing on its own among the groups of a candidate (`2021-07-27`, `15.03.2024`)
_DATE = re.compile(r"(?<!\S)(?:\d{4}([-./])\d{1,2}\1\d{1,2}|\d{1,2}([-./])\d{1,2}\2(?:\d{4}|\d{2}))(?!\S)")
_SSN = re.compile(r"(\d{3})([- ])(\d{2})\2(\d{4})")
_CARD_GROUPINGS = ((4, 4, 4, 4), (4, 4, 4, 4, 3), (4, 6, 5), (4, 6, 4), (4, 4, 4, 4, 2), (4, 4, 4, 1))
_PEM_BODY = re.compile(r"[A-Za-z0-9+/=]{16}")
# "version 1.2.3.4", "v. 10.0.0.1", "build 4.2.1.7": dotted quads that are versions, not addresses
_VERSION_BEFORE = re.compile(r"(?i)(?:\bversion|\brelease|\bbuild|\bver|\brev|\bv)[\s.:#=]{0,3}$")
# The parents of section numbers in a document: `6.2.4` in `6.2.4. Mail servers` or `6.2.4 Mail`.
_SECTION_PARENT = re.compile(r"(\d(?<![\w.]\d)\d{0,2}\.\d{1,3}\.\d{1,3})\.?[ \t]+[^\W\d]")
# Words that say "this is a phone number" shortly before one, in the languages of the web
# (matched as word starts: `tel` covers Tel., Telefon, telephone, telefono, Telefax ...).
_PHONE_WORDS = re.compile(
    r"(?i)(?:\b(?:tel|tél|phone|mobil|móvil|cell|celular|portable|handy|fax|call|ruf|puhelin|whatsapp|"
    r"тел|моб|факс)|電話|电话|手机|携帯|전화|☎|📞)"
)
_NANP_NUMBER = re.compile(r"[2-9]\d\d[2-9]\d{6}")


class ScanTimeout(Exception):
    """A document's scan ran past its time budget (`PiiScanner.scan(..., deadline=...)`)."""


class Finding(NamedTuple):
    """One piece of personal data: its type and where it is (`text[start:end] == value`)."""

    type: str
    start: int
    end: int
    value: str


@dataclass(frozen=True)
class AllowList:
    """What is never reported: documentation domains, ranges and published example values."""

    email_domains: tuple[str, ...] = DEFAULT_ALLOWED_EMAIL_DOMAINS
    email_local_parts: tuple[str, ...] = DEFAULT_ALLOWED_EMAIL_LOCAL_PARTS
    networks: tuple[str, ...] = DEFAULT_ALLOWED_NETWORKS
    values: tuple[str, ...] = DEFAULT_ALLOWED_VALUES

    def parsed_networks(self) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
        try:
            return tuple(ipaddress.ip_network(n, strict=False) for n in self.networks)
        except ValueError as error:
            raise ValueError(f"allow-list network: {error}") from None


# ----------------------------------------------------------------------------------------------
# Validators: each takes the candidate string and says whether it is real personal data.


def luhn_valid(digits: str) -> bool:
    """The Luhn check every payment card number satisfies."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def card_brand(digits: str) -> str | None:
    """The card network whose IIN range and length `digits` fall in, or None."""
    n = len(digits)
    p2, p3, p4, p6 = int(digits[:2]), int(digits[:3]), int(digits[:4]), int(digits[:6])
    if digits[0] == "4" and n in (13, 16, 19):
        return "visa"
    if (51 <= p2 <= 55 or 222100 <= p6 <= 272099) and n == 16:
        return "mastercard"
    if p2 in (34, 37) and n == 15:
        return "amex"
    if (p4 == 6011 or p2 == 65 or 644 <= p3 <= 649 or 622126 <= p6 <= 622925) and 16 <= n <= 19:
        return "discover"
    if 3528 <= p4 <= 3589 and 16 <= n <= 19:
        return "jcb"
    if (300 <= p3 <= 305 or p2 in (36, 38, 39) or p4 == 3095) and 14 <= n <= 19:
        return "diners"
    if p2 == 62 and 16 <= n <= 19:
        return "unionpay"
    if (p2 == 50 or 56 <= p2 <= 69) and 12 <= n <= 19:
        return "maestro"
    return None


def is_payment_card(candidate: str) -> bool:
    """13-19 digits, written plain or in the groups cards are printed in, a known IIN, Luhn."""
    groups = _SPACE_OR_DASH.split(candidate)
    if not all(g.isdigit() for g in groups):
        return False
    if len(groups) > 1:
        separators = set(_SPACE_OR_DASH.findall(candidate))
        if len(separators) != 1 or tuple(len(g) for g in groups) not in _CARD_GROUPINGS:
            return False
    digits = "".join(groups)
    return 13 <= len(digits) <= 19 and card_brand(digits) is not None and luhn_valid(digits)


def is_us_ssn(candidate: str) -> bool:
    """`AAA-GG-SSSS` (or spaced) with an area, group and serial the SSA can issue."""
    match = _SSN.fullmatch(candidate)
    if match is None:
        return False
    area, group, serial = int(match[1]), int(match[3]), int(match[4])
    if area == 0 or area == 666 or area >= 900 or group == 0 or serial == 0:
        return False
    # numbers published in advertising and so never anyone's own
    return f"{match[1]}{match[3]}{match[4]}" not in {"078051120", "219099999", "123456789"}


def is_isbn13(digits: str) -> bool:
    if len(digits) != 13 or digits[:3] not in ("978", "979"):
        return False
    return sum(int(d) * (1 if i % 2 == 0 else 3) for i, d in enumerate(digits)) % 10 == 0


def is_isbn10(digits: str) -> bool:
    return len(digits) == 10 and sum((10 - i) * int(d) for i, d in enumerate(digits)) % 11 == 0


def _written_nationally(number: phonenumbers.PhoneNumber, digits: str) -> bool:
    """A number without + or 00 must be written as it is dialled at home: `030 1234567` is a
    Berlin number, `1700000000` (no trunk 0) is a timestamp, `131 2345 2588` a Chinese mobile."""
    national = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.NATIONAL)
    return _NON_DIGIT.sub("", national) == digits


def _parse_phone_shaped(candidate: str, region: str) -> phonenumbers.PhoneNumber | None:
    """The parsed number if `candidate` is shaped like a phone number at all (not a date, ISBN,
    version or long id), read in `region` unless it starts with + or 00, else None."""
    digits = _NON_DIGIT.sub("", candidate)
    if not 7 <= len(digits) <= 15:
        return None
    if len(digits) > 12 and digits == candidate:
        return None  # ids, timestamps and card numbers: a phone this long is written in groups
    if _DATE.search(candidate) or is_isbn13(digits) or (candidate.count("-") == 3 and is_isbn10(digits)):
        return None
    if "." in candidate and not candidate.startswith("+"):
        # version numbers (3.11.2.1): a dotted phone number has groups of two or more digits
        if any(len(g) < 2 for g in _SPACE_OR_DOT.split(candidate) if g):
            return None
    try:
        number = phonenumbers.parse(candidate, region)
    except phonenumbers.NumberParseException:
        return None
    if number.country_code == 1 and str(number.national_number)[3:] in _NANP_FICTIONAL:
        return None
    if not candidate.startswith(("+", "00")) and not _written_nationally(number, digits):
        return None
    return number


@functools.lru_cache(maxsize=1 << 16)
def is_phone(candidate: str, region: str) -> bool:
    """A number `phonenumbers` says is assigned, read in `region` unless it starts with + or 00.
    Cached: pages repeat the same numbers (footers, contact blocks) and parsing is the slow part."""
    number = _parse_phone_shaped(candidate, region)
    if number is None:
        return False
    if candidate.startswith(("+", "00")):
        return phonenumbers.is_valid_number(number)
    return phonenumbers.is_valid_number_for_region(number, region)


@functools.lru_cache(maxsize=1 << 16)
def is_possible_phone(candidate: str, region: str) -> bool:
    """A number of a length its country dials, written in groups, that `phonenumbers` may not know
    as assigned (`+1 (794) 263-3202`: a new area code). Missing a phone is worse than scrubbing a
    look-alike, so the scanner takes these where the context says phone; a bare digit run never."""
    if candidate.isdigit():
        return False
    number = _parse_phone_shaped(candidate, region)
    if number is None:
        return False
    if number.country_code == 1 and not _NANP_NUMBER.fullmatch(str(number.national_number)):
        return False
    reason = phonenumbers.is_possible_number_with_reason(number)
    return reason == phonenumbers.ValidationResult.IS_POSSIBLE


def phone_context(text: str, start: int, candidate: str) -> bool:
    """A `+` country code, an area code in parentheses, or a phone word (tel, Telefon, 電話, ...)
    in the 32 characters before the candidate."""
    if candidate.startswith("+") or "(" in candidate:
        return True
    return _PHONE_WORDS.search(text, max(0, start - 32), start) is not None


# 555-0100 to 555-0199 are reserved for fiction in the North American plan: films, docs, tests.
_NANP_FICTIONAL = frozenset(f"555{i:04d}" for i in range(100, 200))


def iban_prefix(candidate: str) -> str | None:
    """The valid IBAN at the start of `candidate` (which may run on into the next word), or None.

    The country fixes the length; the match may not end inside a group of the written form."""
    country = candidate[:2]
    length = IBAN_LENGTHS.get(country)
    if length is None:
        return None
    taken = 0
    for i, ch in enumerate(candidate):
        if ch not in " \u00a0":
            taken += 1
        if taken == length:
            rest = candidate[i + 1 : i + 2]
            if rest and rest not in " \u00a0":
                return None
            iban = candidate[: i + 1].replace(" ", "").replace("\u00a0", "")
            rearranged = iban[4:] + iban[:4]
            number = "".join(str(int(ch, 36)) for ch in rearranged)
            return candidate[: i + 1] if int(number) % 97 == 1 else None
    return None


def is_public_ip(candidate: str, public_only: bool, allowed_networks) -> bool:
    """A syntactically valid address; with `public_only`, globally routable unicast only."""
    try:
        address = ipaddress.ip_address(candidate)
    except ValueError:
        return False
    if any(address.version == net.version and address in net for net in allowed_networks):
        return False
    if not public_only:
        return True
    if address.version == 6 and address not in _IPV6_GLOBAL_UNICAST:
        return False
    return address.is_global and not address.is_multicast


_IPV6_GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")


def is_heading_number(text: str, start: int, end: int) -> bool:
    """`6.2.4.1. exim4`, `10.4.2.1.`: a dotted quad opening a line and followed by a period numbers
    a heading. Looks at most 8 characters back, so a line of many addresses stays linear."""
    j = start
    while j > 0 and start - j < 8 and text[j - 1] in " \t#*>":
        j -= 1
    return (j == 0 or text[j - 1] == "\n") and text.startswith(".", end)


def section_parents(text: str) -> frozenset[str]:
    """Every `a.b.c` that numbers a heading in `text` (one pass, done once per document), so that
    `6.2.4.1` is a section where `6.2.4 Mail servers` is one too."""
    return frozenset(_SECTION_PARENT.findall(text))


def is_password_placeholder(value: str) -> bool:
    """`password`, `motdepasse`, `senha`, `your_password`, `votre-mot-de-passe`, `xxxx`: a slot."""
    folded = value.lower()
    if folded in _PLACEHOLDER_FILLER:
        return True
    for separator in "_-. ":
        folded = folded.replace(separator, "")
    if folded in PASSWORD_WORDS:
        return True
    return any(folded.startswith(p) and folded[len(p) :] in PASSWORD_WORDS for p in PASSWORD_POSSESSIVES)


def is_email(candidate: str, allow: AllowList) -> bool:
    local, _, domain = candidate.rpartition("@")
    domain = domain.lower()
    if local.startswith(".") or local.endswith(".") or ".." in local:
        return False
    if domain.rsplit(".", 1)[-1] in FILE_EXTENSION_TLDS:
        return False
    if local.lower() in allow.email_local_parts:
        return False
    return not any(domain == d or domain.endswith("." + d) for d in allow.email_domains)


def is_jwt(candidate: str) -> bool:
    """The header segment decodes (base64url) to a JSON object naming an `alg`."""
    header = candidate.split(".", 1)[0]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(header + "=" * (-len(header) % 4)))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    return isinstance(decoded, dict) and "alg" in decoded


def looks_random(token: str, min_distinct: int = 10) -> bool:
    """Placeholders (`ghp_xxxx...`, `sk_live_0000...`) repeat a few characters; real tokens do not."""
    return len(set(token)) >= min_distinct


def has_key_material(block: str) -> bool:
    """A private-key block with a base64 body, not `...` or `<your key here>`."""
    body = block.split("-----", 2)[2].rsplit("-----END", 1)[0]
    return _PEM_BODY.search(body) is not None


# ----------------------------------------------------------------------------------------------


def _number_readings(value: str) -> list[tuple[int, str]]:
    """Shorter readings of a candidate that may have run into a neighbouring number
    (`+1 201-477-2395 13.4`): without one or two space-separated groups at its end, then at its
    start, as (offset into the candidate, string)."""
    readings = []
    spaces = [i for i, ch in enumerate(value) if ch in " \u00a0"]
    for i in reversed(spaces[-2:]):
        readings.append((0, value[:i].rstrip(")( ")))
    for i in spaces[:2]:
        readings.append((i + 1, value[i + 1 :]))
    return readings


class PiiScanner:
    """Scans text for the enabled types; build once per partition, call `scan` per document."""

    def __init__(
        self,
        types: Iterable[str] = STRUCTURED_TYPES,
        phone_region: str = "US",
        phone_region_from_lang: bool = True,
        public_ips_only: bool = True,
        allow: AllowList | None = None,
    ):
        self.types = frozenset(types)
        unknown = self.types - set(STRUCTURED_TYPES)
        if unknown:
            raise ValueError(f"unknown PII types {sorted(unknown)}; known: {', '.join(STRUCTURED_TYPES)}")
        self.phone_region = phone_region.upper()
        self.phone_region_from_lang = phone_region_from_lang
        self.public_ips_only = public_ips_only
        self.allow = allow or AllowList()
        self._networks = self.allow.parsed_networks()
        self._allowed_values = frozenset(self.allow.values)

    def region_for(self, lang: str | None) -> str:
        if self.phone_region_from_lang and lang:
            return PHONE_REGION_BY_LANG.get(lang.split("-")[0].split("_")[0].lower(), self.phone_region)
        return self.phone_region

    def scan(self, text: str, lang: str | None = None, deadline: float | None = None) -> list[Finding]:
        """Every validated finding in `text`, in order, non-overlapping. With a `deadline` (a
        `time.perf_counter()` value), raises `ScanTimeout` once it passes, checked after each
        candidate: every pattern is linear, so the time between two checks is bounded too."""
        findings: list[Finding] = []
        region = None
        parents: frozenset[str] | None = None  # section numbers, found on the first address
        types = self.types
        pattern = CANDIDATE_PATTERN if "@" in text else _CANDIDATE_PATTERN_NO_EMAIL
        for match in pattern.finditer(text):
            kind = match.lastgroup
            start, end = match.span("password" if kind == "url_password" else 0)
            value = text[start:end]
            if value in self._allowed_values:
                continue
            found: str | None = None
            if kind == "slack_webhook":
                kind = "slack_token"
            if kind in _NUMBER_KINDS:
                region = region or self.region_for(lang)
                found = self._classify_number(value, region, text, start)
                if found is None and " " in value and len(_NON_DIGIT.sub("", value)) >= 8:
                    for offset, reading in _number_readings(value):
                        found = self._classify_number(reading, region, text, start + offset)
                        if found is not None:
                            start, end, value = start + offset, start + offset + len(reading), reading
                            break
            elif kind in ("ipv4", "ipv6"):
                if (
                    "ip_address" in types
                    and is_public_ip(value, self.public_ips_only, self._networks)
                    and not _VERSION_BEFORE.search(text, max(0, start - 16), start)
                ):
                    found = "ip_address"
                    if kind == "ipv4" and is_heading_number(text, start, end):
                        found = None
                    elif kind == "ipv4" and all(len(part) <= 2 for part in value.split(".")):
                        # section numbers have at most two digits a level; only then is the
                        # document searched for the parent section
                        parents = section_parents(text) if parents is None else parents
                        if value.rsplit(".", 1)[0] in parents:
                            found = None
            elif kind == "iban":
                if "iban" in types:
                    iban = iban_prefix(value)
                    if iban is not None:
                        found, end, value = "iban", start + len(iban), iban
            elif kind is not None and kind in types:
                found = kind if self._validate(kind, value) else None
            if found is not None:
                findings.append(Finding(found, start, end, value))
            if deadline is not None and time.perf_counter() > deadline:
                raise ScanTimeout(f"stopped after {len(findings)} findings at character {end} of {len(text)}")
        return findings

    def _classify_number(self, value: str, region: str, text: str, start: int) -> str | None:
        """Payment card, SSN or phone, tried in that order (a card number is never a phone); a
        possible but unassigned phone number counts where its context says phone."""
        types = self.types
        n = len(_NON_DIGIT.sub("", value))
        if n >= 13 and "payment_card" in types and is_payment_card(value):
            return "payment_card"
        if n == 9 and "us_ssn" in types and is_us_ssn(value):
            return "us_ssn"
        if 7 <= n <= 15 and "phone" in types and (
            is_phone(value, region) or (is_possible_phone(value, region) and phone_context(text, start, value))
        ):
            return "phone"
        return None

    def _validate(self, kind: str, value: str) -> bool:
        if kind == "email":
            return is_email(value, self.allow)
        if kind == "jwt":
            return is_jwt(value)
        if kind == "private_key":
            return has_key_material(value)
        if kind == "url_password":
            return not is_password_placeholder(value) and not _is_template(value)
        return looks_random(value)  # the token kinds


_TEMPLATE = re.compile(r"\$\{[^}]*\}|\$[A-Z_][A-Z0-9_]*|<[^>]*>|\{\{?[^}]*\}\}?|%\([^)]*\)s|%s|\[[^\]]*\]")


def _is_template(value: str) -> bool:
    """`${DB_PASSWORD}`, `{password}`, `<password>`, `%(password)s`, `$PASS`: a slot, not a secret."""
    return _TEMPLATE.fullmatch(value) is not None


class PersonNameDetector:
    """Person names through Presidio and a spaCy model the user installed (never downloaded here)."""

    def __init__(self, min_score: float = 0.85, language: str = "en"):
        try:
            from presidio_analyzer import AnalyzerEngine
        except ImportError:
            raise ImportError(
                "pii: `names: true` needs the presidio-analyzer package and a spaCy model "
                "(pip install 'gristmill[names]' && python -m spacy download en_core_web_lg)"
            ) from None
        self.engine = AnalyzerEngine(supported_languages=[language])
        self.min_score = min_score
        self.language = language

    def scan(self, text: str) -> list[Finding]:
        results = self.engine.analyze(text=text, entities=["PERSON"], language=self.language)
        return [
            Finding(NAME_TYPE, r.start, r.end, text[r.start : r.end])
            for r in sorted(results, key=lambda r: r.start)
            if r.score >= self.min_score
        ]


def merge_findings(structured: list[Finding], names: list[Finding]) -> list[Finding]:
    """Structured findings win; a name overlapping one of them is dropped, as are overlapping names."""
    merged = sorted(structured + names, key=lambda f: (f.start, f.type == NAME_TYPE))
    out: list[Finding] = []
    for finding in merged:
        if out and finding.start < out[-1].end:
            if finding.type == NAME_TYPE or out[-1].type != NAME_TYPE:
                continue
            out.pop()
        out.append(finding)
    return out
