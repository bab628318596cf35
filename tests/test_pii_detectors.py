"""PII detectors: each type finds what it should and not the look-alikes found in real pages."""

from __future__ import annotations

import base64
import json
import random
import string

import pytest

from gristmill.pipeline.pii.detectors import (
    AllowList,
    Finding,
    PiiScanner,
    iban_prefix,
    is_payment_card,
    is_us_ssn,
    luhn_valid,
    merge_findings,
)

SCANNER = PiiScanner()
PHONES = PiiScanner(types=["phone"])


def found(text: str, lang: str | None = None, scanner: PiiScanner = SCANNER) -> list[tuple[str, str]]:
    """(type, value) of every finding; also checks each span points at its value."""
    findings = scanner.scan(text, lang)
    for f in findings:
        assert text[f.start : f.end] == f.value
    return [(f.type, f.value) for f in findings]


def jwt(header: dict, payload: dict, signature: str = "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c") -> str:
    def b64(obj: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")

    return f"{b64(header)}.{b64(payload)}.{signature}"


def random_token(alphabet: str, n: int, seed: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(alphabet) for _ in range(n))


ALNUM = string.ascii_letters + string.digits


# ---------------------------------------------------------------------------------------------- e-mail


def test_email_addresses_in_prose_are_found_with_exact_spans():
    text = "Write to jane.doe+lists@mail.univ-lyon1.fr or to Jörg.Müller@beispiel-firma.de today."
    assert found(text) == [("email", "jane.doe+lists@mail.univ-lyon1.fr"), ("email", "Jörg.Müller@beispiel-firma.de")]


def test_email_look_alikes_are_not_addresses():
    text = (
        "icon@2x.png, @types/node, user@localhost, pip install pkg==1.0@latest, "
        "a..b@corp.com, decorators like @property and git@ (no host)"
    )
    assert found(text) == []


def test_email_allow_list_covers_documentation_domains_and_noreply():
    text = "bob@example.com, ops@mail.example.org, x@test, noreply@github.com, No-Reply@corp.io, real@corp.io"
    assert found(text) == [("email", "real@corp.io")]
    scanner = PiiScanner(allow=AllowList(email_domains=("corp.io",), email_local_parts=()))
    assert found(text, scanner=scanner) == [("email", "bob@example.com"), ("email", "ops@mail.example.org"),
                                            ("email", "noreply@github.com")]


# ---------------------------------------------------------------------------------------------- phone


def test_international_phone_numbers_are_found_in_any_language():
    text = "Tel. +49 89 12345678 · Téléphone : +33 1 42 68 53 00 · UK +44 20 7946 0958 · US +1 (415) 555-2671."
    assert [v for t, v in found(text)] == ["+49 89 12345678", "+33 1 42 68 53 00", "+44 20 7946 0958",
                                           "+1 (415) 555-2671"]


def test_national_phone_numbers_follow_the_document_language():
    german = "Rufen Sie uns an: 030 1234567 oder mobil 0171 1234567."
    french = "Appelez le 01 42 68 53 00 ou le 06.12.34.56.78."
    assert found(german, "de") == [("phone", "030 1234567"), ("phone", "0171 1234567")]
    assert found(french, "fr") == [("phone", "01 42 68 53 00"), ("phone", "06.12.34.56.78")]
    assert found("Call (415) 555-2671 or 212-555-0199.", "en") == [("phone", "(415) 555-2671")]
    fixed_us = PiiScanner(phone_region="US", phone_region_from_lang=False)
    assert found(french, "fr", scanner=fixed_us) == []


def test_unassigned_north_american_area_codes_are_phones_in_a_phone_context():
    # 794 is not (yet) an assigned area code: phonenumbers calls these numbers invalid
    text = "Sales +1 (794) 263-3202, support +1 794 263 3202, office (794) 263-3202, Telefon: 794-263-3202."
    assert [v for _, v in found(text, "en", scanner=PHONES)] == [
        "+1 (794) 263-3202", "+1 794 263 3202", "(794) 263-3202", "794-263-3202"]
    assert found("電話 794-263-3202", "ja", scanner=PiiScanner(types=["phone"], phone_region_from_lang=False)) == [
        ("phone", "794-263-3202")]


def test_possible_numbers_without_phone_context_or_in_bare_digit_runs_are_not_phones():
    text = "order 794-263-3202 shipped; tel 7942633202; case +1 (194) 263-3202; ref 794-163-3202"
    assert found(text, "en", scanner=PHONES) == []


@pytest.mark.parametrize(
    "text",
    [
        "Released 2023-01-15, patched 15.03.2024 and 03/15/2024.",
        "Requires Python 3.11.2.1 or libfoo 10.12.14.2, build 20.04.1.123",
        "ISBN 978-3-16-148410-0 and ISBN-10 0-306-40615-2",
        "| 1024 | 2048 | 4096 | 8192 |\n12 34 56 78 90 12 34 56\n100 200 300 400 500 600 700",
        "epoch 1700000000, millis 1700000000123, order #20230115001",
        "for (i = 0; i < 1000000; i++) x[i] = (i * 2654435761) % 4294967296;",
    ],
)
def test_numbers_that_are_not_phones_are_ignored(text):
    for lang in ("de", "fr", "en"):
        assert found(text, lang, scanner=PHONES) == []


# ---------------------------------------------------------------------------------------------- IP


def test_public_ipv4_and_ipv6_addresses_are_found():
    text = "Resolver 8.8.8.8, server 212.94.201.10; v6 2606:4700:4700::1111 and 2a00:1450:4001:81b::200e."
    assert [v for t, v in found(text)] == ["8.8.8.8", "212.94.201.10", "2606:4700:4700::1111",
                                           "2a00:1450:4001:81b::200e"]


def test_private_documentation_and_version_addresses_are_ignored_by_default():
    text = (
        "LAN 192.168.1.10, 10.0.0.1, 127.0.0.1, docs 192.0.2.44 and 198.51.100.7 and 2001:db8::1, "
        "link-local fe80::1, version 1.2.3.4, novas==3.1.1.3, file pkg-2.4.1.10.tar.gz, "
        "time 12:30:45, MAC 00:1a:2b:3c:4d:5e, C++ std::vector and a::b, 999.1.1.1"
    )
    assert found(text) == []


def test_all_addresses_when_public_only_is_off_except_documentation_ranges():
    scanner = PiiScanner(public_ips_only=False)
    assert [v for _, v in found("LAN 192.168.1.10 and docs 203.0.113.5", scanner=scanner)] == ["192.168.1.10"]


def test_addresses_written_as_key_value_are_addresses_not_phones():
    text = "Nov 3 sshd[811]: client=81.2.69.160 ip=81.22.69.160 from=212.94.201.10 src=2a00:1450:4001:81b::200e"
    assert found(text) == [("ip_address", "81.2.69.160"), ("ip_address", "81.22.69.160"),
                           ("ip_address", "212.94.201.10"), ("ip_address", "2a00:1450:4001:81b::200e")]
    assert found("version=1.2.3.4 pkg>=3.1.1.3 pkg~=4.1.1.3 pkg!=5.1.1.3") == []


def test_section_numbers_are_not_addresses():
    manual = (
        "6.2.4. Mail servers\n6.2.4.1. exim4\nConfigure exim4 first.\n  10.4.2.1. Tuning\n"
        "## 81.2.69.160.\nSee 6.2.4.2 for postfix.\n"
    )
    assert found(manual) == []


def test_an_address_ending_a_sentence_is_still_an_address():
    text = "The mail came from 81.2.69.160. Block it.\nConnect to\n81.2.69.161 now. 6.2.4.1 is also a host."
    assert [v for _, v in found(text)] == ["81.2.69.160", "81.2.69.161", "6.2.4.1"]


# ---------------------------------------------------------------------------------------------- cards


def test_luhn_and_card_ranges():
    assert luhn_valid("4111111111111111") and not luhn_valid("4111111111111112")
    for number in ("4111 1111 1111 1111", "5555-5555-5555-4444", "378282246310005", "3782 822463 10005",
                   "6011111111111117", "2221000000000009", "3530111333300000"):
        assert is_payment_card(number), number
    # Luhn-valid but no card network issues 1..., mixed separators, wrong grouping
    for number in ("1234567812345670", "4111 1111-1111 1111", "41 1111 1111 1111 11", "4111111111111112"):
        assert not is_payment_card(number), number


def test_cards_in_text_and_numeric_tables_that_are_not_cards():
    text = "Paid with 4111 1111 1111 1111 (exp 12/27). Amex 3782 822463 10005."
    assert found(text) == [("payment_card", "4111 1111 1111 1111"), ("payment_card", "3782 822463 10005")]
    assert found("Row totals: 4096 1024 2048 8192 and id 1234567812345670.") == []


# ---------------------------------------------------------------------------------------------- IBAN


def test_ibans_of_several_countries_with_and_without_spaces():
    text = (
        "Überweisung an DE89 3704 0044 0532 0130 00 bitte. Virement: FR14 2004 1010 0505 0001 3M02 606. "
        "UK GB82WEST12345698765432, NL91ABNA0417164300, ES91 2100 0418 4502 0005 1332 THE END"
    )
    assert [v for _, v in found(text)] == ["DE89 3704 0044 0532 0130 00", "FR14 2004 1010 0505 0001 3M02 606",
                                           "GB82WEST12345698765432", "NL91ABNA0417164300",
                                           "ES91 2100 0418 4502 0005 1332"]


def test_iban_checksum_length_and_country_are_checked():
    assert iban_prefix("DE89370400440532013000") == "DE89370400440532013000"
    assert iban_prefix("DE89370400440532013001") is None  # mod-97 fails
    assert iban_prefix("DE8937040044053201300") is None  # one character short for Germany
    assert iban_prefix("QQ89370400440532013000") is None  # no such country
    assert found("ISO codes AB12 CDEF GHIJ KLMN and US00 1234 5678 9012 are not IBANs") == []


# ---------------------------------------------------------------------------------------------- SSN


def test_us_ssn_area_group_and_serial_rules():
    assert is_us_ssn("536-22-8726") and is_us_ssn("536 22 8726")
    for bad in ("000-12-3456", "666-12-3456", "912-12-3456", "536-00-8726", "536-22-0000",
                "078-05-1120", "536-22 8726", "53-622-8726"):
        assert not is_us_ssn(bad), bad
    assert found("SSN: 536-22-8726; part no. 666-12-3456; phone ext 555-12-1234") == [("us_ssn", "536-22-8726"),
                                                                                    ("us_ssn", "555-12-1234")]


# ---------------------------------------------------------------------------------------------- secrets


def test_cloud_and_service_tokens_are_found():
    aws = "AKIA" + random_token("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", 16, 1)
    github = "ghp_" + random_token(ALNUM, 36, 2)
    gitlab = "glpat-" + random_token(ALNUM + "_-", 20, 3)
    slack = "xoxb-123456789012-1234567890123-" + random_token(ALNUM, 24, 4)
    stripe = "sk_live_" + random_token(ALNUM, 24, 5)
    text = f"export AWS_ACCESS_KEY_ID={aws}\ntoken: {github}\nGITLAB={gitlab} slack='{slack}' stripe.api_key = \"{stripe}\""
    assert found(text) == [("aws_access_key", aws), ("github_token", github), ("gitlab_token", gitlab),
                           ("slack_token", slack), ("stripe_key", stripe)]


def test_token_placeholders_and_published_examples_are_not_secrets():
    text = (
        "AWS_ACCESS_KEY_ID=AKIAIOSFODNN7EXAMPLE token ghp_xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx "
        "sk_live_000000000000000000000000 glpat-xxxxxxxxxxxxxxxxxxxx pk_live_" + random_token(ALNUM, 24, 6)
    )
    assert found(text) == []


def test_private_key_blocks_but_not_placeholders():
    body = "\n".join(random_token(ALNUM + "+/", 64, seed) for seed in range(4))
    block = f"-----BEGIN RSA PRIVATE KEY-----\n{body}\n-----END RSA PRIVATE KEY-----"
    text = f"key:\n{block}\nand a template:\n-----BEGIN PRIVATE KEY-----\n...\n-----END PRIVATE KEY-----\n" \
           "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----"
    assert found(text) == [("private_key", block)]


def test_jwts_need_a_header_that_decodes_to_json_with_alg():
    token = jwt({"alg": "HS256", "typ": "JWT"}, {"sub": "1234567890", "name": "John Doe"})
    no_alg = jwt({"typ": "JWT", "kid": "k1"}, {"sub": "1234567890"})
    assert found(f"Authorization: Bearer {token}") == [("jwt", token)]
    assert found(f"header {no_alg} and eyJnotbase64json.eyJzdWIiOiIx.abc") == []


def test_passwords_in_urls_but_not_placeholders():
    text = (
        "DATABASE_URL=postgres://app:Tr0ub4dor&3@db.internal:5432/app "
        "docs: postgresql://user:password@localhost/db, https://${USER}:${PASS}@host/ "
        "redis://:<password>@cache:6379, ftp://anonymous@ftp.example.net/"
    )
    assert found(text) == [("url_password", "Tr0ub4dor&3")]


def test_placeholder_passwords_in_other_languages_are_not_passwords():
    text = (
        "smb://utilisateur:motdepasse@serveur/partage ftp://usuário:senha@servidor/ "
        "mysql://usuario:contraseña@servidor/db sftp://benutzer:Passwort@server/ "
        "http://utente:la_password@host/ https://gebruiker:wachtwoord@host/ "
        "ssh://user:votre-mot-de-passe@hote/ imap://user:your_password@host/ "
        "ftp://u:пароль@сервер/ ftp://u:senha9Xq2@servidor/"
    )
    assert found(text) == [("url_password", "senha9Xq2")]


# ---------------------------------------------------------------------------------------------- general


def test_uuids_hashes_and_code_contain_no_pii():
    text = (
        "id 123e4567-e89b-12d3-a456-426614174000 md5 d41d8cd98f00b204e9800998ecf8427e "
        "sha256 9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n"
        "x = 0x7fffffff; int mask = 0xDEADBEEF; def f(a, b): return a @ b\n"
        "SELECT * FROM t WHERE id IN (1001, 1002, 1003) LIMIT 100;"
    )
    assert found(text) == []


def test_only_enabled_types_are_reported():
    scanner = PiiScanner(types=["email"])
    assert found("mail a@corp.io, call +49 89 12345678, ip 8.8.8.8", scanner=scanner) == [("email", "a@corp.io")]
    with pytest.raises(ValueError, match="unknown PII types \\['emails'\\]"):
        PiiScanner(types=["emails"])


def test_allow_listed_values_are_skipped():
    scanner = PiiScanner(allow=AllowList(values=("8.8.8.8",)))
    assert found("dns 8.8.8.8 and 1.1.1.1", scanner=scanner) == [("ip_address", "1.1.1.1")]


def test_names_lose_to_overlapping_structured_findings():
    structured = [Finding("email", 10, 25, "x")]
    names = [Finding("person", 0, 8, "a"), Finding("person", 9, 14, "b"), Finding("person", 30, 35, "c")]
    assert [(f.type, f.start) for f in merge_findings(structured, names)] == [("person", 0), ("email", 10),
                                                                             ("person", 30)]
