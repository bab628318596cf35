"""The pii stage on hostile input: every detector is linear, and a document that still takes too
long is set aside with its reason instead of stalling its part."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from gristmill.pipeline import io
from gristmill.pipeline.pii.detectors import PiiScanner, ScanTimeout
from gristmill.pipeline.pii.stage import PiiConfig, scrub_partition

SCANNER = PiiScanner()

# For each detector, a unit that, repeated, keeps opening a candidate that never completes (or
# completes over and over): the inputs a backtracking regex turns quadratic.
ADVERSARIAL_UNITS = {
    "jwt": ["eyJ-", "eyJhbGciOi.", "eyJa.eyJ"],
    "aws_access_key": ["AKIA"],
    "github_token": ["ghp_", "github_pat_"],
    "gitlab_token": ["glpat-"],
    "slack_token": ["xoxb-", "xoxb-1-", "https://hooks.slack.com/services/T"],
    "stripe_key": ["sk_live_"],
    "iban": ["DE89 ", "GB"],
    "ip_address": ["1.1.1.1.", "1:", "a=81.2.69.160.", "6.2.4.1. "],
    "phone / card / ssn": ["1 ", "(1", "+1 ", "1-", "Tel. 1 "],
    "email": ["a@", "a.", "a@b.", "a-", "a@b-", "@."],
    "private_key": ["-----BEGIN PRIVATE KEY-----\n", "-----BEGIN "],
    "url_password": ["://a:", "://a:b", "x://u:p@"],
}


def seconds(text: str) -> float:
    started = time.perf_counter()
    SCANNER.scan(text)
    return time.perf_counter() - started


def best_times(small: str, large: str) -> tuple[float, float]:
    """Best small and best large scan time, measured in turns so a busy moment hits both; fast
    inputs get more turns (up to half a second in all) because their times are the noisiest."""
    best_small = best_large = float("inf")
    spent, turns = 0.0, 0
    while turns < 2 or (spent < 0.5 and turns < 25):
        t_small, t_large = seconds(small), seconds(large)
        best_small, best_large = min(best_small, t_small), min(best_large, t_large)
        spent, turns = spent + t_small + t_large, turns + 1
    return best_small, best_large


@pytest.mark.parametrize(
    "unit", [pytest.param(u, id=f"{kind}:{u!r}") for kind, units in ADVERSARIAL_UNITS.items() for u in units]
)
def test_every_detector_is_linear_on_adversarial_input(unit: str):
    small, large = ((unit * (n // len(unit) + 1))[:n] for n in (100_000, 400_000))
    small_s, large_s = best_times(small, large)
    ratio = large_s / max(small_s, 1e-4)
    # Linear is 4x, quadratic 16x. A scan of 100k characters can fit in the CPU caches where 400k
    # does not, which alone gives fast scans ratios near 10; a scan of 400k adversarial characters
    # done in under 0.1 s is linear in any sense that matters (the quadratic JWT pattern took 90 s).
    assert ratio < 9 or large_s < 0.1, f"{unit!r}: 4x the input took {ratio:.1f}x the time ({large_s:.2f} s)"


def test_jwt_prefix_repeated_a_million_times_is_scanned_in_a_blink():
    started = time.perf_counter()
    assert SCANNER.scan("eyJ-" * 250_000) == []
    assert time.perf_counter() - started < 5  # was 590 s


def test_scan_past_its_deadline_raises_scan_timeout():
    text = "Write to bob@corp.io. " * 10
    with pytest.raises(ScanTimeout, match="character"):
        SCANNER.scan(text, deadline=time.perf_counter() - 1)
    assert len(SCANNER.scan(text, deadline=time.perf_counter() + 60)) == 10


def test_document_over_its_time_budget_is_removed_with_a_reason_and_the_part_goes_on():
    slow = "Write to bob@corp.io. " * 50_000  # 50,000 findings: about a second of work
    texts = ["Call bob@corp.io today.", slow, "nothing here"]
    table = pa.Table.from_pylist(
        [{"id": f"d{i}", "url": None, "text": t, "source": "fixture", "fetch_time": None, "lang": "en",
          "lang_score": None} for i, t in enumerate(texts)],
        schema=io.DOCUMENT_SCHEMA,
    )
    out = scrub_partition(table, PiiConfig(type="pii", seconds_per_document=0.05))
    assert out.removed.column("id").to_pylist() == ["d1"]
    assert out.removed.column("reason").to_pylist() == ["pii:time_budget"]
    assert out.removed.column("text").to_pylist() == [slow]  # set aside as it came, never half-scrubbed
    assert out.kept.column("text").to_pylist() == ["Call <EMAIL> today.", "nothing here"]
    assert out.stats["removed_by_reason"] == {"pii:time_budget": 1}


def test_time_budget_must_be_positive_or_null():
    assert PiiConfig(type="pii", seconds_per_document=None).seconds_per_document is None
    with pytest.raises(ValueError, match="seconds_per_document"):
        PiiConfig(type="pii", seconds_per_document=0)
