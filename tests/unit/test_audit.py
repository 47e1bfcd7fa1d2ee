import json

from server.audit import AuditLog


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
