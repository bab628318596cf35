"""Benchmark the pii stage: recall and precision per type on planted PII, and documents/s against
datatrove's PIIFormatter (e-mails and public IPv4 only) on the same documents, in one process.

What is compared. The labelled set is built by construction, never from gristmill's output: the
text of the bundled sample site's pages (resiliparse, main content), into which known PII of every
structured type is planted at line and sentence ends with a fixed seed, together with decoys that
must not be reported. The planted values come from `faker` in the page's locale (names, e-mails,
phones, IBANs, cards, SSNs, public IPv4/IPv6) or are built from the vendors' documented formats
(tokens, JWTs, PEM blocks, URL passwords); none is generated or filtered with gristmill's validators.
Where the benchmark checks a value it says so and uses an independent library:

- phones: faker's number, its extension cut off, kept when `phonenumbers` says it is *possible*
  (a length the country dials; NANP numbers also need NXX area and exchange codes). A number that
  phonenumbers does not call *valid* (an unassigned area code, `+1 (794) 263-3202`) is planted
  only in a phone context (a tel/phone word in the page's language, a `+` country code or
  parentheses) and never as a bare digit run, the others in any context; a number of another
  country than the page's is written in phonenumbers' international format;
- IBANs and cards: faker's values, checked with `python-stdnum` (`iban.is_valid`, `luhn.is_valid`);
  the IBAN and card decoys are faker's values with a check digit changed, which stdnum rejects;
- cards: Visa, Mastercard, Amex and Discover (faker's JCB prefixes include unissued 3500-3527);
- IPs: `ipaddress` (standard library) says the address is global, not multicast, and an IPv6
  one is in 2000::/3, the only range IANA has allocated (faker draws from all of IPv6).

Items 17-20 of issue 15 are in the set: addresses written `client=`/`ip=`/`from=` (PII), phones with
unassigned NANP area codes in a phone context (PII), section-number headings such as `6.2.4.1. exim4`
(decoys) and URL credentials with placeholder passwords in French, Portuguese, Spanish, German,
Italian and Dutch (decoys). The other decoys: dates, versions, ISBNs, UUIDs, hashes, numeric
tables, private and documentation IPs, placeholder tokens, example.com addresses.

Scoring. A finding is a true positive when its type and span equal a planted item's. A finding
that overlaps a planted piece (PII, decoy or the sentence around it) and is not a true positive is
a false positive. The pages' own text is not labelled: the PII the pages already hold (a few
maintainers' addresses, an IP in a DNS example) is neither credited nor charged, and findings there
are only counted and printed (`unscored_in_page_text`). datatrove's recall and precision for e-mail
and ip_address are scored the same way, from the regexes and IP validator its PIIFormatter applies.
The JSON line's `ratio` is gristmill's documents/s over datatrove's (gristmill checks 14 types,
datatrove 2).

    python -m benchmarks.pii [--quick] [--seed 0]
"""

from __future__ import annotations

import argparse
import base64
import ipaddress
import json
import random
import re
import string
import time
from collections import Counter

import phonenumbers
import pyarrow as pa
from faker import Faker
from stdnum import iban as stdnum_iban
from stdnum import luhn

from benchmarks.sample_pages import sample_pages
from gristmill.pipeline import io
from gristmill.pipeline.pii.detectors import STRUCTURED_TYPES, is_phone, is_possible_phone
from gristmill.pipeline.pii.stage import PiiConfig, scrub_partition

ALNUM = string.ascii_letters + string.digits
BASE32 = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567"
LOCALES = {"en": "en_US", "de": "de_DE", "fr": "fr_FR", "es": "es_ES", "it": "it_IT", "pt": "pt_BR", "ja": "ja_JP",
           "ru": "ru_RU", "zh": "zh_CN", "nl": "nl_NL"}
OTHER_LOCALES = ("en_US", "en_GB", "de_DE", "fr_FR", "es_ES", "it_IT", "nl_NL", "pt_BR", "ja_JP")
# how a page says "phone" before a number, by language
PHONE_WORDS = {"en": ["Phone:", "Tel.", "call", "Mobile:", "Fax"], "de": ["Telefon:", "Tel.", "Mobil:", "Fax"],
               "fr": ["Téléphone :", "Tél.", "Portable :"], "es": ["Teléfono:", "Tel.", "Móvil:"],
               "it": ["Telefono:", "Tel.", "Cellulare:"], "pt": ["Telefone:", "Tel.", "Celular:"],
               "ja": ["電話", "TEL"], "ru": ["Телефон:", "Тел."], "zh": ["电话：", "手机："], "nl": ["Telefoon:", "Tel."]}
GLOBAL_UNICAST = ipaddress.ip_network("2000::/3")
EXTENSION = re.compile(r"\s*(?:x|ext\.?)\s*\d+$")


def load_pages() -> list[tuple[str, str]]:
    """(text, lang) of every sample-site page; the handbook's folder names give the language."""
    return [(p.text, p.lang) for p in sample_pages() if len(p.text) > 200]


def token(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


class Planter:
    """Planted values and decoys from faker (seeded), one Faker per locale."""

    def __init__(self, seed: int):
        self.rng = random.Random(seed)
        self.fakers: dict[str, Faker] = {}
        self.seed = seed

    def faker(self, locale: str) -> Faker:
        if locale not in self.fakers:
            fake = Faker(locale)
            fake.seed_instance(self.seed)
            self.fakers[locale] = fake
        return self.fakers[locale]

    def locale(self, lang: str) -> str:
        """The page's locale half the time, another common one otherwise."""
        return LOCALES.get(lang, "en_US") if self.rng.random() < 0.5 else self.rng.choice(OTHER_LOCALES)

    # ---------------------------------------------------------------------------------------- PII

    def email(self, lang: str) -> str:
        fake = self.faker(self.locale(lang))
        return fake.free_email() if self.rng.random() < 0.5 else fake.company_email()

    def phone(self, lang: str) -> tuple[str, bool]:
        """A faker number that phonenumbers calls possible, and whether it also calls it valid. A
        number of another country than the page's is written internationally (nobody can read a
        foreign national number), and one phonenumbers does not call valid is never a bare digit run."""
        home = LOCALES.get(lang, "en_US").split("_")[1]
        while True:
            locale = self.locale(lang)
            value = EXTENSION.sub("", self.faker(locale).phone_number())
            region = locale.split("_")[1]
            try:
                number = phonenumbers.parse(value, region)
            except phonenumbers.NumberParseException:
                continue
            if number.country_code == 1 and not re.fullmatch(r"[2-9]\d\d[2-9]\d{6}", str(number.national_number)):
                continue
            if str(number.national_number)[3:6] == "555" and number.country_code == 1:
                continue  # 555 numbers are for fiction
            if phonenumbers.is_possible_number_with_reason(number) != phonenumbers.ValidationResult.IS_POSSIBLE:
                continue
            valid = phonenumbers.is_valid_number(number)
            if not valid and value.isdigit():
                continue
            if region != home and not value.startswith(("+", "00")):
                value = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.INTERNATIONAL)
            return value, valid

    def nanp_unassigned(self, lang: str) -> str:
        """A North American number whose area code is not assigned (item 18 of issue 15)."""
        while True:
            area = self.rng.randint(200, 999)
            number = phonenumbers.parse(f"+1{area}{self.rng.randint(200, 999)}{self.rng.randint(0, 9999):04d}")
            if not phonenumbers.is_valid_number(number) and str(number.national_number)[3:6] != "555":
                n = str(number.national_number)
                forms = [f"+1 ({n[:3]}) {n[3:6]}-{n[6:]}", f"+1 {n[:3]} {n[3:6]} {n[6:]}"]
                if LOCALES.get(lang, "en_US") == "en_US":  # written nationally on American pages only
                    forms.append(f"({n[:3]}) {n[3:6]}-{n[6:]}")
                return self.rng.choice(forms)

    def ip_address(self, lang: str) -> str:
        fake = self.faker("en_US")
        while True:
            value = fake.ipv4_public() if self.rng.random() < 0.6 else fake.ipv6()
            address = ipaddress.ip_address(value)
            if address.version == 6 and address not in GLOBAL_UNICAST:
                continue  # IANA has allocated 2000::/3 only; faker draws from all of IPv6
            if address.is_global and not address.is_multicast:
                return address.compressed

    def payment_card(self, lang: str) -> str:
        fake = self.faker("en_US")
        # not faker's JCB: it draws from 35xx, of which only 3528-3589 is JCB's
        number = fake.credit_card_number(self.rng.choice(["visa16", "mastercard", "amex", "discover"]))
        assert luhn.is_valid(number)
        if self.rng.random() < 0.4:
            return number
        groups = (4, 6, 5) if len(number) == 15 else (4, 4, 4, 4)
        out, i = [], 0
        for g in groups:
            out.append(number[i : i + g])
            i += g
        return self.rng.choice([" ", "-"]).join(out)

    def iban(self, lang: str) -> str:
        locale = self.rng.choice(["de_DE", "fr_FR", "en_GB", "es_ES", "it_IT", "nl_NL", "de_AT", "de_CH", "nl_BE",
                                  "pl_PL"])
        value = self.faker(locale).iban()
        assert stdnum_iban.is_valid(value), value
        return self.grouped(value)

    def grouped(self, value: str) -> str:
        return " ".join(value[i : i + 4] for i in range(0, len(value), 4)) if self.rng.random() < 0.5 else value

    def us_ssn(self, lang: str) -> str:
        return self.faker("en_US").ssn()

    def jwt(self, lang: str) -> str:
        def b64(obj):
            return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

        rng = self.rng
        header = {"alg": rng.choice(["HS256", "RS256", "ES256"]), "typ": "JWT"}
        payload = {"sub": str(rng.randint(10**6, 10**9)), "name": self.faker("en_US").name(),
                   "iat": rng.randint(1_500_000_000, 1_800_000_000)}
        return f"{b64(header)}.{b64(payload)}.{token(rng, ALNUM + '-_', 43)}"

    def private_key(self, lang: str) -> str:
        kind = self.rng.choice(["RSA ", "EC ", "OPENSSH ", ""])
        body = "\n".join(token(self.rng, ALNUM + "+/", 64) for _ in range(self.rng.randint(3, 8)))
        return f"-----BEGIN {kind}PRIVATE KEY-----\n{body}\n-----END {kind}PRIVATE KEY-----"

    def value(self, pii_type: str, lang: str) -> str:
        rng = self.rng
        tokens = {
            "aws_access_key": lambda: rng.choice(["AKIA", "ASIA"]) + token(rng, BASE32, 16),
            "github_token": lambda: rng.choice(["ghp_", "gho_", "ghs_"]) + token(rng, ALNUM, 36),
            "gitlab_token": lambda: "glpat-" + token(rng, ALNUM + "_-", 20),
            "slack_token": lambda: f"xoxb-{rng.randint(10**11, 10**12)}-{rng.randint(10**12, 10**13)}-"
                                   + token(rng, ALNUM, 24),
            "stripe_key": lambda: rng.choice(["sk_live_", "sk_test_", "rk_live_"]) + token(rng, ALNUM, 24),
        }
        if pii_type in tokens:
            return tokens[pii_type]()
        return getattr(self, pii_type)(lang)

    # ---------------------------------------------------------------------------------------- decoys

    def decoy(self) -> str:
        """Something that looks like PII to a careless detector and is not."""
        rng = self.rng
        choice = rng.randrange(15)
        if choice == 0:
            return f"{rng.randint(1990, 2030)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"
        if choice == 1:
            return f"{rng.randint(1, 28):02d}.{rng.randint(1, 12):02d}.{rng.randint(1990, 2030)}"
        if choice == 2:
            return f"version {rng.randint(0, 20)}.{rng.randint(0, 40)}.{rng.randint(0, 200)}"
        if choice == 3:
            isbn = self.faker("en_US").isbn13(separator="-")
            return f"ISBN {isbn}"
        if choice == 4:
            return self.faker("en_US").uuid4()
        if choice == 5:
            return token(rng, "0123456789abcdef", rng.choice([32, 40, 64]))
        if choice == 6:
            return " | ".join(str(rng.randint(100, 99999)) for _ in range(rng.randint(3, 6)))
        if choice == 7:
            card = self.faker("en_US").credit_card_number()
            bad = card[:-1] + str((int(card[-1]) + rng.randint(1, 9)) % 10)  # one Luhn digit off: never valid
            assert not luhn.is_valid(bad)
            return bad
        if choice == 8:
            value = self.faker(rng.choice(["de_DE", "fr_FR", "en_GB"])).iban()
            bad = value
            while stdnum_iban.is_valid(bad):  # 98 -> 01 would still pass mod 97
                bad = value[:2] + f"{(int(value[2:4]) + rng.randint(1, 9)) % 100:02d}" + value[4:]
            return self.grouped(bad)
        if choice == 9:
            return rng.choice([f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
                               f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}", f"192.0.2.{rng.randint(1, 254)}",
                               "127.0.0.1", f"2001:db8::{rng.randint(1, 9999):x}"])
        if choice == 10:
            return rng.choice(["ghp_" + "x" * 36, "AKIAIOSFODNN7EXAMPLE", "sk_live_" + "0" * 24,
                               "postgres://user:password@localhost/db",
                               "-----BEGIN PRIVATE KEY-----\n...\n-----END PRIVATE KEY-----"])
        if choice == 11:  # section numbers in a manual (item 19)
            parts = [rng.randint(1, 12), rng.randint(1, 9), rng.randint(1, 9)]
            heading = self.faker("en_US").word()
            return rng.choice([f"\n{'.'.join(map(str, parts))}.{rng.randint(1, 9)}. {heading}\n",
                               f"\n{'.'.join(map(str, parts))}. {heading}\n{'.'.join(map(str, parts))}.1 {heading}\n"])
        if choice == 12:  # placeholder credentials in other languages (item 20)
            return rng.choice(["smb://utilisateur:motdepasse@serveur/partage", "ftp://usuário:senha@servidor/",
                               "mysql://usuario:contraseña@servidor/db", "sftp://benutzer:passwort@server/",
                               "http://utente:la_password@host/", "https://gebruiker:wachtwoord@host/",
                               "ssh://utilisateur:votre_mot_de_passe@hote/", "ftp://user:kennwort@server/"])
        if choice == 13:
            return f"pip install novas=={rng.randint(1, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}.{rng.randint(0, 9)}"
        return rng.choice(["user@example.com", "noreply@github.com", "admin@mail.example.org", "icon@2x.png"])


# Sentences around a planted value; `{}` is where it goes.
CONTEXTS = ["Contact: {}.", "Kontakt {} bitte.", "Voir {} pour plus.", "see ({})", "value = \"{}\"", "{}",
            "- {}\n", "Details: {} (internal)."]
# Server-log forms of an address (item 17)
KEY_VALUE = ["client={}", "ip={}", "from={}", "src={} dst=10.0.0.1", "remote_addr={}"]


def planted_sentence(planter: Planter, pii_type: str, lang: str) -> tuple[str, int, int]:
    """A sentence holding one planted value and the value's span in it."""
    rng = planter.rng
    context = rng.choice(CONTEXTS)
    if pii_type == "url_password":
        password = planter.faker("en_US").password(length=rng.randint(8, 20), special_chars=False)
        user = planter.faker(planter.locale(lang)).user_name()
        prefix = f"postgres://{user}:"
        filled = context.format(f"{prefix}{password}@db{rng.randint(1, 9)}.corp.io:5432/app")
        start = context.index("{}") + len(prefix)
        return filled, start, start + len(password)
    if pii_type == "phone":
        if rng.random() < 0.25:
            value, valid = planter.nanp_unassigned(lang), False
        else:
            value, valid = planter.phone(lang)
        if not valid or rng.random() < 0.5:  # a number phonenumbers does not know needs a phone context
            context = f"{rng.choice(PHONE_WORDS.get(lang, PHONE_WORDS['en']))} {{}}"
    elif pii_type == "ip_address" and rng.random() < 0.3:
        value = planter.ip_address(lang)
        context = f"Nov 3 12:01:44 mail sshd[811]: {rng.choice(KEY_VALUE)} port {rng.randint(1024, 65535)}"
    else:
        value = planter.value(pii_type, lang)
    start = context.index("{}")
    return context.format(value), start, start + len(value)


def plant(text: str, lang: str, planter: Planter, n_pii: int, n_decoys: int) -> tuple[str, list[tuple], list[tuple]]:
    """`text` with PII and decoys inserted at line or sentence ends; returns it, the labels (type,
    start, end) of the planted PII, and the (start, end) of every inserted piece."""
    rng = planter.rng
    cuts = sorted({i + 1 for i, ch in enumerate(text) if ch == "\n" or (ch == " " and text[i - 1] == ".")})
    items = [("pii", t) for t in rng.choices(list(STRUCTURED_TYPES), k=n_pii)] + [("decoy", None)] * n_decoys
    rng.shuffle(items)
    positions = sorted(rng.sample(cuts, min(len(items), len(cuts)))) if cuts else []
    pieces, labels, inserted, last, length = [], [], [], 0, 0
    for position, (kind, pii_type) in zip(positions, items):
        pieces.append(text[last:position])
        length += position - last
        last = position
        if kind == "decoy":
            insert = f" {planter.decoy()} "
        else:
            filled, start, end = planted_sentence(planter, pii_type, lang)
            insert = f" {filled} "
            labels.append((pii_type, length + 1 + start, length + 1 + end))
        inserted.append((length, length + len(insert)))
        pieces.append(insert)
        length += len(insert)
    pieces.append(text[last:])
    return "".join(pieces), labels, inserted


def build_documents(pages, copies: int, seed: int):
    planter = Planter(seed)
    texts, langs, labels, inserted = [], [], [], []
    for _ in range(copies):
        for text, lang in pages:
            rng = planter.rng
            planted, doc_labels, doc_inserted = plant(text, lang, planter, rng.randint(1, 8), rng.randint(1, 6))
            texts.append(planted)
            langs.append(lang)
            labels.append(doc_labels)
            inserted.append(doc_inserted)
    return texts, langs, labels, inserted


def overlaps(start: int, end: int, pieces: list[tuple[int, int]]) -> bool:
    return any(start < b and a < end for a, b in pieces)


def score(found_per_doc, labels_per_doc, inserted_per_doc, types=STRUCTURED_TYPES):
    """Recall and precision per type over planted pieces, and the unscored findings in page text."""
    tp, fp, fn, unscored = Counter(), Counter(), Counter(), Counter()
    for found, labels, inserted in zip(found_per_doc, labels_per_doc, inserted_per_doc):
        truth = {label for label in labels if label[0] in types}
        for item in set(found):
            if item in truth:
                tp[item[0]] += 1
            elif overlaps(item[1], item[2], inserted):
                fp[item[0]] += 1
            else:
                unscored[item[0]] += 1
        for item in truth - set(found):
            fn[item[0]] += 1
    recall = {t: round(tp[t] / (tp[t] + fn[t]), 4) if tp[t] + fn[t] else None for t in types}
    precision = {t: round(tp[t] / (tp[t] + fp[t]), 4) if tp[t] + fp[t] else None for t in types}
    return recall, precision, tp + fn, unscored


def reference_findings(reference, text: str) -> list[tuple]:
    """(type, start, end) of what datatrove's PIIFormatter replaces, from its own regexes and validator."""
    emails = [("email", *m.span()) for m in reference.emails_replacer.regex.finditer(text)]
    validator = reference.ip_replacer.validator
    ips = [("ip_address", *m.span()) for m in reference.ip_replacer.regex.finditer(text) if validator(m.group(0))]
    return emails + ips


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one copy of the pages, three timing rounds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    pages = load_pages()
    copies, rounds = (1, 3) if args.quick else (4, 5)
    texts, langs, labels, inserted = build_documents(pages, copies, args.seed)
    table = pa.Table.from_pylist(
        [{"id": str(i), "url": None, "text": t, "source": "benchmark", "fetch_time": None, "lang": lang,
          "lang_score": None} for i, (t, lang) in enumerate(zip(texts, langs))],
        schema=io.DOCUMENT_SCHEMA,
    )
    config = PiiConfig(type="pii")

    from datatrove.pipeline.formatters import PIIFormatter

    reference = PIIFormatter()
    # Warm-up, untimed, both sides on every document: phonenumbers loads a region's metadata on first
    # use, which is a once-per-process cost, not a per-document one.
    scrub_partition(table, config)
    for text in texts:
        reference.format(text)
    ours_s, ref_s = [], []
    for _ in range(rounds):  # interleaved, best of: the machine is shared and noisy
        is_phone.cache_clear()  # no round may profit from the one before
        is_possible_phone.cache_clear()
        t0 = time.perf_counter()
        out = scrub_partition(table, config)
        ours_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for text in texts:
            reference.format(text)
        ref_s.append(time.perf_counter() - t0)

    found = [[(s["type"], s["start"], s["end"]) for s in spans] for spans in out.kept.column("pii_spans").to_pylist()]
    recall, precision, support, unscored = score(found, labels, inserted)
    ref_types = ("email", "ip_address")
    ref_recall, ref_precision, _, _ = score([reference_findings(reference, t) for t in texts], labels, inserted,
                                            ref_types)
    docs_per_s = len(texts) / min(ours_s)
    reference_docs_per_s = len(texts) / min(ref_s)
    print(f"{len(texts)} documents, {sum(map(len, texts)) / 1e6:.1f} M characters, "
          f"{sum(support.values())} planted PII")
    print(f"{'type':<16}{'planted':>8}{'recall':>8}{'precision':>10}{'datatrove recall':>18}{'precision':>10}")
    for t in STRUCTURED_TYPES:
        ref = f"{ref_recall[t]!s:>18}{ref_precision[t]!s:>10}" if t in ref_types else ""
        print(f"{t:<16}{support[t]:>8}{recall[t]!s:>8}{precision[t]!s:>10}{ref}")
    print(f"findings in the pages' own (unlabelled, unscored) text: {dict(unscored)}")
    print(f"gristmill pii: {docs_per_s:,.0f} docs/s ({len(STRUCTURED_TYPES)} types); "
          f"datatrove PIIFormatter: {reference_docs_per_s:,.0f} docs/s (2 types)")
    print(json.dumps({
        "benchmark": "pii",
        "recall": recall,
        "precision": precision,
        "reference_recall": ref_recall,
        "reference_precision": ref_precision,
        "unscored_in_page_text": dict(unscored),
        "targets": {"recall": 0.98, "precision": 0.95},
        "docs_per_s": round(docs_per_s, 1),
        "reference_docs_per_s": round(reference_docs_per_s, 1),
        "ratio": round(docs_per_s / reference_docs_per_s, 3),
        "target": 1,
    }))


if __name__ == "__main__":
    main()
