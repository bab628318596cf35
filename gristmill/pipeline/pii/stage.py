"""The `pii` stage: find personal data and secrets in every document and replace them.

Each document is scanned once (`detectors.PiiScanner`), every finding is replaced according
to its type's policy, and two columns are added:

- `pii_counts`: a struct with one int32 count per type (all types, zeros included);
- `pii_spans`: a list of `{type, start, end, replacement, original}`, `start`/`end` being code-point
  offsets into the text *before* replacement, in order. `original` is the replaced string when
  `store_originals` is on (the default, for the dashboard's before/after view; the values then
  live in this stage's run folder, so share `kept/` only with whoever may see the raw crawl) and
  null when it is off. Originals never travel further: document stages downstream read the spans
  with `original` nulled, and `write` exports them only with `pii_originals: true`.

Documents are never dropped for containing personal data; only a record that cannot be scanned
goes to `removed/` with its reason: `pii:null_text`, or `pii:time_budget` when its scan ran past
`seconds_per_document` (it could not be checked, so it must not go on unscrubbed; the part goes on).
"""

from __future__ import annotations

import hashlib
import importlib.util
import time
from typing import Any, Literal

import phonenumbers
import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from gristmill.pipeline import io
from gristmill.pipeline.pii.detectors import (
    ALL_TYPES,
    DEFAULT_ALLOWED_EMAIL_DOMAINS,
    DEFAULT_ALLOWED_EMAIL_LOCAL_PARTS,
    DEFAULT_ALLOWED_NETWORKS,
    DEFAULT_ALLOWED_VALUES,
    NAME_TYPE,
    STRUCTURED_TYPES,
    AllowList,
    Finding,
    PersonNameDetector,
    PiiScanner,
    ScanTimeout,
    merge_findings,
)
from gristmill.pipeline.stage import PartitionOutput, StageConfig, document_stage

Policy = Literal["tag", "pseudonym", "hash", "annotate"]

COUNTS_TYPE = pa.struct([(name, pa.int32()) for name in ALL_TYPES])
SPAN_TYPE = pa.struct(
    [
        ("type", pa.string()),
        ("start", pa.int32()),
        ("end", pa.int32()),
        ("replacement", pa.string()),
        ("original", pa.string()),
    ]
)
SPANS_TYPE = pa.list_(SPAN_TYPE)
PII_COLUMNS = pa.schema([("pii_counts", COUNTS_TYPE), ("pii_spans", SPANS_TYPE)])


class PiiConfig(StageConfig):
    """Which types to find, how to replace each, and what is never personal data."""

    types: list[str] = list(STRUCTURED_TYPES)  # add "person" for names (needs presidio-analyzer)
    policy: Policy = "tag"
    policies: dict[str, Policy] = {}  # per-type overrides of `policy`
    hash_salt: str | None = None  # required by the `hash` policy: unsalted hashes of phones are reversible
    phone_region: str = "US"  # how to read national-format numbers (no + or 00)
    phone_region_from_lang: bool = True  # a `de` document reads them as German, `fr` as French, ...
    public_ips_only: bool = True  # private, loopback and reserved addresses identify no one
    allow_email_domains: list[str] = list(DEFAULT_ALLOWED_EMAIL_DOMAINS)
    allow_email_local_parts: list[str] = list(DEFAULT_ALLOWED_EMAIL_LOCAL_PARTS)
    allow_networks: list[str] = list(DEFAULT_ALLOWED_NETWORKS)
    allow_values: list[str] = list(DEFAULT_ALLOWED_VALUES)
    store_originals: bool = True  # keep replaced strings in `pii_spans` and the stats examples
    examples_per_type: int = 3  # before/after examples per type in stats.json
    example_window: int = 40  # characters of context either side of an example
    names_min_score: float = 0.85  # Presidio score a person name needs
    names_language: str = "en"
    # a document whose scan takes longer goes to removed/ as `pii:time_budget`; null: no limit
    seconds_per_document: float | None = Field(default=10.0, gt=0)

    @field_validator("types")
    @classmethod
    def _known_types(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(ALL_TYPES))
        if unknown:
            raise ValueError(f"unknown PII types {unknown}; known: {', '.join(ALL_TYPES)}")
        return value

    @field_validator("policies")
    @classmethod
    def _known_policy_types(cls, value: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(value) - set(ALL_TYPES))
        if unknown:
            raise ValueError(f"policies for unknown PII types {unknown}; known: {', '.join(ALL_TYPES)}")
        return value

    @field_validator("phone_region")
    @classmethod
    def _known_region(cls, value: str) -> str:
        if value.upper() not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"{value!r} is not a region phonenumbers knows (use a code such as US, DE, FR)")
        return value.upper()

    @field_validator("allow_networks")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        AllowList(networks=tuple(value)).parsed_networks()
        return value

    @model_validator(mode="after")
    def _policies_can_run(self) -> PiiConfig:
        if self.hash_salt is None and any(self.policy_for(t) == "hash" for t in self.types):
            raise ValueError("policy `hash` needs `hash_salt` (a secret string; without it hashes can be reversed)")
        if NAME_TYPE in self.types and importlib.util.find_spec("presidio_analyzer") is None:
            raise ValueError(
                "type `person` needs the presidio-analyzer package and a spaCy model: "
                "pip install 'gristmill[names]' && python -m spacy download en_core_web_lg"
            )
        return self

    def policy_for(self, pii_type: str) -> Policy:
        return self.policies.get(pii_type, self.policy)

    def scanner(self) -> PiiScanner:
        return PiiScanner(
            types=[t for t in self.types if t != NAME_TYPE],
            phone_region=self.phone_region,
            phone_region_from_lang=self.phone_region_from_lang,
            public_ips_only=self.public_ips_only,
            allow=AllowList(
                email_domains=tuple(d.lower() for d in self.allow_email_domains),
                email_local_parts=tuple(p.lower() for p in self.allow_email_local_parts),
                networks=tuple(self.allow_networks),
                values=tuple(self.allow_values),
            ),
        )


def replacement_for(finding: Finding, policy: Policy, pseudonyms: dict[tuple[str, str], str], salt: str | None) -> str:
    """The string that takes the finding's place. `pseudonyms` numbers values per type within one
    document, so the same address is `<EMAIL_1>` everywhere in it and a second one `<EMAIL_2>`."""
    tag = finding.type.upper()
    if policy == "tag":
        return f"<{tag}>"
    if policy == "pseudonym":
        key = (finding.type, finding.value)
        if key not in pseudonyms:
            pseudonyms[key] = f"<{tag}_{sum(1 for t, _ in pseudonyms if t == finding.type) + 1}>"
        return pseudonyms[key]
    if policy == "hash":
        digest = hashlib.blake2b(f"{salt}\0{finding.type}\0{finding.value}".encode(), digest_size=6).hexdigest()
        return f"<{tag}:{digest}>"
    return finding.value  # annotate


def scrub(text: str, findings: list[Finding], config: PiiConfig) -> tuple[str, list[str]]:
    """The text with every finding replaced by its policy, and the replacements in finding order."""
    pseudonyms: dict[tuple[str, str], str] = {}
    pieces: list[str] = []
    replacements: list[str] = []
    position = 0
    for finding in findings:
        replacement = replacement_for(finding, config.policy_for(finding.type), pseudonyms, config.hash_salt)
        pieces.append(text[position : finding.start])
        pieces.append(replacement)
        replacements.append(replacement)
        position = finding.end
    pieces.append(text[position:])
    return "".join(pieces), replacements


def restore_original(scrubbed: str, spans: list[dict[str, Any]]) -> str:
    """The text before replacement, from the scrubbed text and spans stored with originals
    (what the dashboard shows as "before")."""
    pieces: list[str] = []
    position = 0  # in the scrubbed text
    shift = 0  # scrubbed offset minus original offset so far
    for span in spans:
        if span["original"] is None:
            raise ValueError("spans were stored without originals (store_originals: false)")
        start = span["start"] + shift
        pieces.append(scrubbed[position:start])
        pieces.append(span["original"])
        position = start + len(span["replacement"])
        shift += len(span["replacement"]) - (span["end"] - span["start"])
    pieces.append(scrubbed[position:])
    return "".join(pieces)


def _example(doc_id: str, text: str, scrubbed: str, finding: Finding, out_start: int, out_end: int,
             config: PiiConfig) -> dict:
    """Before/after context of one finding; `out_start`/`out_end` is its replacement in `scrubbed`."""
    w = config.example_window
    example = {"id": doc_id, "type": finding.type, "after": scrubbed[max(0, out_start - w) : out_end + w]}
    if config.store_originals:
        example["before"] = text[max(0, finding.start - w) : finding.end + w]
    return example


def finalize_pii_stats(stats: dict[str, Any], config: PiiConfig) -> dict[str, Any]:
    """After merging parts: keep `examples_per_type` examples per type and record the policies."""
    kept_examples: list[dict] = []
    per_type: dict[str, int] = {}
    for example in stats.get("examples", []):
        if per_type.get(example["type"], 0) < config.examples_per_type:
            per_type[example["type"]] = per_type.get(example["type"], 0) + 1
            kept_examples.append(example)
    return {
        **stats,
        "examples": kept_examples,
        "types": list(config.types),
        "policies": {t: config.policy_for(t) for t in config.types},
    }


def scan_within_budget(scanner: PiiScanner, names: PersonNameDetector | None, text: str, lang: str | None,
                       seconds: float | None) -> list[Finding]:
    """Structured findings, merged with names when enabled; raises `ScanTimeout` past `seconds`
    (checked between candidates and before the name model runs)."""
    deadline = None if seconds is None else time.perf_counter() + seconds
    findings = scanner.scan(text, lang, deadline)
    if names is not None:
        if deadline is not None and time.perf_counter() > deadline:
            raise ScanTimeout("no time left for the name model")
        findings = merge_findings(findings, names.scan(text))
    return findings


@document_stage("pii", PiiConfig, finalize_stats=finalize_pii_stats)
def scrub_partition(table: pa.Table, config: PiiConfig) -> PartitionOutput:
    """Scan and scrub one part; documents with null text go to `removed` as `pii:null_text`, those
    whose scan runs past the time budget as `pii:time_budget`."""
    if "text" not in table.column_names:
        raise ValueError(f"pii: input has no `text` column (columns: {', '.join(table.column_names)})")
    scanner = config.scanner()
    names = PersonNameDetector(config.names_min_score, config.names_language) if NAME_TYPE in config.types else None
    table = table.drop_columns([c for c in PII_COLUMNS.names if c in table.column_names])
    texts = table.column("text").to_pylist()
    langs = table.column("lang").to_pylist() if "lang" in table.column_names else [None] * len(texts)
    ids = table.column("id").to_pylist() if "id" in table.column_names else [str(i) for i in range(len(texts))]

    # One count list per type and one flat list per span field: the Arrow columns are built from
    # these in one go instead of from a dict per span and per document. Counts are indexed by kept
    # row; the slots left over by null texts are cut off below.
    counts_by_type: dict[str, list[int]] = {t: [0] * len(texts) for t in ALL_TYPES}
    span_offsets = [0]
    span_types: list[str] = []
    span_starts: list[int] = []
    span_ends: list[int] = []
    span_replacements: list[str] = []
    span_originals: list[str | None] = []
    examples: list[dict] = []
    example_counts = dict.fromkeys(ALL_TYPES, 0)
    keep_mask: list[bool] = []
    removed_reasons: list[str] = []
    out_texts: list[str] = []
    docs_touched = characters = 0
    for doc_id, text, lang in zip(ids, texts, langs):
        if text is None:
            keep_mask.append(False)
            removed_reasons.append("pii:null_text")
            continue
        try:
            findings = scan_within_budget(scanner, names, text, lang, config.seconds_per_document)
        except ScanTimeout:
            keep_mask.append(False)
            removed_reasons.append("pii:time_budget")
            continue
        row = len(out_texts)
        keep_mask.append(True)
        characters += len(text)
        if not findings:
            out_texts.append(text)
            span_offsets.append(len(span_types))
            continue
        scrubbed, replacements = scrub(text, findings, config)
        shift = 0  # offset in `scrubbed` minus offset in `text` so far
        for finding, replacement in zip(findings, replacements):
            counts_by_type[finding.type][row] += 1
            if example_counts[finding.type] < config.examples_per_type:
                example_counts[finding.type] += 1
                out_start = finding.start + shift
                examples.append(_example(doc_id, text, scrubbed, finding, out_start, out_start + len(replacement),
                                         config))
            shift += len(replacement) - (finding.end - finding.start)
            span_types.append(finding.type)
            span_starts.append(finding.start)
            span_ends.append(finding.end)
            span_replacements.append(replacement)
            span_originals.append(finding.value if config.store_originals else None)
        docs_touched += 1
        out_texts.append(scrubbed)
        span_offsets.append(len(span_types))

    kept = table.filter(pa.array(keep_mask, type=pa.bool_()))
    kept = kept.set_column(kept.schema.get_field_index("text"), "text", pa.array(out_texts, type=pa.string()))
    counts = {t: column[: len(out_texts)] for t, column in counts_by_type.items()}
    counts_column = pa.StructArray.from_arrays(
        [pa.array(counts[t], type=pa.int32()) for t in ALL_TYPES], fields=list(COUNTS_TYPE)
    )
    span_values = [span_types, span_starts, span_ends, span_replacements, span_originals]
    spans_column = pa.ListArray.from_arrays(
        pa.array(span_offsets, type=pa.int32()),
        pa.StructArray.from_arrays(
            [pa.array(values, type=field.type) for values, field in zip(span_values, SPAN_TYPE)], fields=list(SPAN_TYPE)
        ),
        type=SPANS_TYPE,
    )
    kept = kept.append_column("pii_counts", counts_column)
    kept = kept.append_column("pii_spans", spans_column)
    removed = io.with_reason(table.filter(pa.array([not k for k in keep_mask], type=pa.bool_())), removed_reasons)
    stats = {
        "documents": kept.num_rows,
        "documents_with_pii": docs_touched,
        "characters": characters,
        "found": {t: sum(column) for t, column in counts.items()},
        "documents_by_type": {t: sum(1 for n in column if n) for t, column in counts.items()},
        "removed_by_reason": {r: removed_reasons.count(r) for r in sorted(set(removed_reasons))},
        "examples": examples,
    }
    return PartitionOutput(kept, removed, stats)
