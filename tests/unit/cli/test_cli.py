"""The CLI's commands that neither train nor serve import neither torch nor vLLM (nor boto3 on a directory
registry, nor OpenTelemetry), so they start fast."""

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
print(code, "torch" in sys.modules, "vllm" in sys.modules, "boto3" in sys.modules, "opentelemetry" in sys.modules)
"""


def run_cli(*args: str, env: dict) -> tuple[str, str]:
    r = subprocess.run([sys.executable, "-c", PROBE, *args], capture_output=True, text=True, timeout=60,
                       env={**os.environ, **env})
    return r.stdout.strip().splitlines()[-1], r.stderr


def test_adapters_add_and_help_import_neither_torch_nor_vllm(base, adapter_factory, tmp_path):
    env = {"LORAPLEX_BASE_MODEL": str(base.path), "LORAPLEX_REGISTRY": str(tmp_path / "reg"),
           "LORAPLEX_STATE_DIR": str(tmp_path / "state")}
    line, err = run_cli("adapters", "add", "acme", str(adapter_factory()), env=env)
    assert line == "0 False False False False", err
    assert json.loads((tmp_path / "reg" / "acme" / "1" / "manifest.json").read_text())["rank"] == 4
    for args in (["--help"], ["keys", "list"], ["registry", "check"], ["audit", "--since", "1d"]):
        line, err = run_cli(*args, env=env)
        assert line.split()[1:] == ["False"] * 4, (args, line, err)


def test_registry_commands_on_object_storage(base, adapter_factory, tmp_path, s3_url):
    """`adapters add`, `registry copy` and `registry check` against a real S3 store (SeaweedFS), and back."""
    from loadtest.servers import LOADER

    env = {**os.environ, "LORAPLEX_BASE_MODEL": str(base.path), "LORAPLEX_REGISTRY": s3_url,
           "LORAPLEX_STATE_DIR": str(tmp_path / "state")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([LOADER, *args], env=env, capture_output=True, text=True, timeout=120)

    for seed in range(2):
        r = cli("adapters", "add", "acme", str(adapter_factory(seed=seed)), "--tenant", "acme")
        assert r.returncode == 0 and f"registered acme@{seed + 1}" in r.stdout, r.stderr
    r = cli("registry", "copy", s3_url, str(tmp_path / "backup"))
    assert r.returncode == 0 and "copied 2 versions" in r.stdout and "ok: 2 versions of 1 adapters" in r.stdout, \
        r.stdout + r.stderr
    weights = tmp_path / "backup" / "acme" / "2" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    r = cli("registry", "check", str(tmp_path / "backup"))
    assert r.returncode == 1 and "acme@2: adapter_model.safetensors does not match" in r.stdout
    assert cli("registry", "check").returncode == 0  # LORAPLEX_REGISTRY: the store itself is intact
    r = subprocess.run([LOADER, "registry", "check"], env={**env, "LORAPLEX_REGISTRY": "s3://"},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: LORAPLEX_REGISTRY:") and "bucket" in r.stderr


def test_a_base_model_the_server_cannot_read_ends_serve_in_one_line(base, tmp_path):
    """As root nothing is unreadable by mode, so a config.json that is a directory stands in for one that is."""
    (base.path / "config.json").unlink()
    (base.path / "config.json").mkdir()
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "LORAPLEX_BASE_MODEL": str(base.path),
                            "LORAPLEX_STATE_DIR": str(tmp_path / "state"), "LORAPLEX_REGISTRY": str(tmp_path / "r")})
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert r.stderr.strip().splitlines() == [f"error: base model {base.path}: cannot read {base.path / 'config.json'}: "
                                             "Is a directory"]


def test_the_demo_model_is_written_readable_by_every_user(tmp_path):
    from server.trainer.demo_model import _save

    class Writes:
        def save_pretrained(self, directory, **_) -> None:
            (directory / f"{type(self).__name__}.json").write_text("{}")

    out = _save(Writes(), type("Tokenizer", (Writes,), {})(), tmp_path / "model")
    assert oct(out.stat().st_mode & 0o777) == "0o755"
    assert {oct(f.stat().st_mode & 0o777) for f in out.iterdir()} == {"0o644"}


def test_adapters_compose_registers_the_recipe_and_refuses_bad_ones_in_one_line(base, adapter_factory, tmp_path):
    from loadtest.servers import LOADER

    env = {**os.environ, "LORAPLEX_BASE_MODEL": str(base.path), "LORAPLEX_REGISTRY": str(tmp_path / "reg"),
           "LORAPLEX_STATE_DIR": str(tmp_path / "state")}

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([LOADER, *args], env=env, capture_output=True, text=True, timeout=120)

    for name, rank in (("a", 4), ("b", 8), ("big", 16)):
        assert cli("adapters", "add", name, str(adapter_factory(rank=rank)), "--tenant", "acme").returncode == 0
    r = cli("adapters", "compose", "mix", "--from", "a@1:0.7", "--from", "b:0.3", "--tenant", "acme")
    assert r.returncode == 0 and "registered mix@1 (latest) rank 12 composed of 0.7 a@1 + 0.3 b@1" in r.stdout, r.stderr
    manifest = json.loads((tmp_path / "reg" / "mix" / "1" / "manifest.json").read_text())
    assert [(p["name"], p["version"], p["weight"]) for p in manifest["recipe"]] == [("a", 1, 0.7), ("b", 1, 0.3)]
    refusals = {
        ("--from", "a@1:0.5", "--from", "big@1:0.5"): "the composed rank 20 = a@1 (rank 4) + big@1 (rank 16) "
                                                       "exceeds MAX_LORA_RANK 16",
        ("--from", "a@1"): "--from 'a@1': expected NAME@VERSION:WEIGHT",
        ("--from", "a@1:x"): "--from 'a@1:x': expected NAME@VERSION:WEIGHT",
        ("--from", "a@1:0.001"): "weight 0.001 must be non-zero",
        ("--from", "nope@1:1"): "nope",
    }
    for args, words in refusals.items():
        r = cli("adapters", "compose", "mix", *args, "--tenant", "acme")
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, (args, r.stderr)
    r = cli("adapters", "compose", "composed.x", "--from", "a@1:1", "--tenant", "acme")
    assert r.returncode == 1 and "reserved" in r.stderr
    assert sorted(p.name for p in (tmp_path / "reg" / "mix").iterdir() if p.name.isdigit()) == ["1"]
