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

