"""The soak of `make soak`, shortened for CI: load, adapter churn and faults on a gateway and engine of its own."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_short_soak(base_model, tmp_path):
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, "-m", "loadtest.soak", "--duration", "75", "--rate", "4", "--adapters", "8",
                        "--churn-every", "2", "--base-model", str(base_model), "--out", str(out)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.exists(), r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(out.read_text())
    print(json.dumps(report, indent=1))
    assert report["http_5xx"] == 0 and report["failures"] == 0, report["first_failures"]
    assert report["statuses"]["200"] > 200
    assert report["http_429"] > 0, "the overload burst should have met the in-flight limit"
    assert report["faults_injected"]["client disconnects"] > 0
    assert report["churn"]["uploads"] > 10 and report["churn"]["version deletes"] > 0
    assert report["churn"]["adapter deletes"] > 0
    assert report["registry_check"]["returncode"] == 0, report["registry_check"]
    for part, m in report["memory"].items():
        assert m["growth"] < 0.05, (part, m)
    assert report["passed"] and r.returncode == 0
