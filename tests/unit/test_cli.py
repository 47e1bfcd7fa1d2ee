"""The CLI's commands that neither train nor serve import neither torch nor vLLM, so they start fast."""

import json
import os
import subprocess
import sys

PROBE = """
import sys
from server.cli import main
sys.argv[0] = "loraplex"
code = 0
try:
    main()
except SystemExit as e:
    code = e.code
print(code, "torch" in sys.modules, "vllm" in sys.modules)
"""


def run_cli(*args: str, env: dict) -> tuple[str, str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **env})
    return r.stdout.strip().splitlines()[-1], r.stderr


def test_adapters_add_and_help_import_neither_torch_nor_vllm(base, adapter_factory, tmp_path):
    env = {"LORAPLEX_BASE_MODEL": str(base.path), "LORAPLEX_REGISTRY": str(tmp_path / "reg"),
           "LORAPLEX_STATE_DIR": str(tmp_path / "state")}
    line, err = run_cli("adapters", "add", "acme", str(adapter_factory()), env=env)
    assert line == "0 False False", err
    assert json.loads((tmp_path / "reg" / "acme" / "1" / "manifest.json").read_text())["rank"] == 4
    for args in (["--help"], ["keys", "list"], ["registry", "check"]):
        line, err = run_cli(*args, env=env)
        assert line.split()[1:] == ["False", "False"], (args, line, err)
