import json
from concurrent.futures import ProcessPoolExecutor

import pytest

from server.core.durations import duration, parse_since
from server.observability.audit import AuditLog


def test_audit_log_appends_json_lines(tmp_path):
    log = AuditLog(tmp_path)
    log.record("admin@x", "upload", "acme", 1, "ab" * 32, tenant="t")
    log.record("cli:root", "delete", "acme", result="refused: nope")
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    assert [(e["actor"], e["action"], e["version"], e["result"]) for e in lines] == [
        ("admin@x", "upload", 1, "ok"), ("cli:root", "delete", None, "refused: nope")]
    assert {"time", "actor", "action", "adapter", "version", "sha256", "result"} <= set(lines[0])



def test_audit_streams_in_the_object_store_are_merged_by_time(s3_url, tmp_path):
    """Each process writes its own stream beside an object-store registry; reading merges every stream."""
    gateways = [AuditLog(tmp_path / "a", s3_url), AuditLog(tmp_path / "b", s3_url)]
    for i in range(6):
        gateways[i % 2].record(f"admin{i % 2}", "upload", "acme", i + 1)
    entries = AuditLog(tmp_path / "c", s3_url).entries()
    assert [e["version"] for e in entries] == [1, 2, 3, 4, 5, 6]
    assert {e["actor"] for e in entries} == {"admin0", "admin1"}
    assert not (tmp_path / "a" / "audit.log").exists()
    assert len({k.rsplit("/", 1)[0] for k, _ in gateways[0].store.keys("_loraplex/audit/")}) == 2


def _write(state_dir: str, writer: int, lines: int) -> None:
    log = AuditLog(state_dir, rotate_bytes=2000)
    for i in range(lines):
        log.record("tester", "line", f"w{writer}", i)


def test_the_log_rotates_without_losing_a_line(tmp_path):
    """Three processes append at once to a log that rotates every ~2 kB: every line is read back, once."""
    with ProcessPoolExecutor(3) as pool:
        list(pool.map(_write, [str(tmp_path)] * 3, range(3), [100] * 3))
    assert len(list(tmp_path.glob("audit.log.[0-9]*"))) > 10
    entries = AuditLog(tmp_path).entries()
    assert sorted((e["adapter"], e["version"]) for e in entries) == [(f"w{w}", i) for w in range(3) for i in range(100)]


@pytest.mark.parametrize("text,expected", [("30m", 1_000_000 - 1800), ("2h", 1_000_000 - 7200),
                                           ("1.5d", 1_000_000 - 129_600), ("1970-01-01T00:01:00", 60.0),
                                           ("1970-01-01T01:00:00+01:00", 0.0)])
def test_since_takes_ages_and_iso_times(text, expected):
    assert parse_since(text, now=1_000_000) == expected


def test_since_names_what_it_takes():
    with pytest.raises(ValueError, match="neither an ISO 8601 time nor an age"):
        parse_since("yesterday")
    for unicode_digits in ("²m", "١٢h", "²"):  # digits to \\d or str.isdigit(), never to this parser
        with pytest.raises(ValueError, match="neither an ISO 8601 time nor an age"):
            parse_since(unicode_digits)
    assert duration("²") is None and duration("12") == 12.0
