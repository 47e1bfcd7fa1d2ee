"""A merge is refused before any work when it cannot be trusted: a quantized base, an --out in use, a bad dtype."""

import json
import os
import subprocess

from loadtest.servers import LOADER


def cli(base, tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "LORAPLEX_BASE_MODEL": str(base.path), "LORAPLEX_REGISTRY": str(tmp_path / "reg"),
           "LORAPLEX_STATE_DIR": str(tmp_path / "state")}
    return subprocess.run([LOADER, *args], env=env, capture_output=True, text=True, timeout=120)


def test_merge_refusals_are_one_line_and_write_nothing(base, adapter_factory, tmp_path):
    assert cli(base, tmp_path, "adapters", "add", "a", str(adapter_factory())).returncode == 0
    config = json.loads((base.path / "config.json").read_text())
    quantized = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (base.path / "config.json").write_text(json.dumps({**config, "quantization_config": quantized}))
    used = tmp_path / "used"
    used.mkdir()
    (used / "keep").write_text("x")
    refusals = {
        ("--out", str(tmp_path / "m")): "is quantized (bitsandbytes); merge into the full-precision base the manifest "
                                        f"names, {str(base.path)!r}",
        ("--out", str(used)): f"--out {used}: exists and is not an empty directory",
        ("--out", str(tmp_path / "m"), "--dtype", "float16"): "--dtype 'float16': float32 or bfloat16",
    }
    for args, words in refusals.items():
        r = cli(base, tmp_path, "adapters", "merge", "a@1", *args)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and words in r.stderr, (args, r.stderr)
    assert not (tmp_path / "m").exists() and [p.name for p in used.iterdir()] == ["keep"]
    missing = cli(base, tmp_path, "adapters", "merge", "zz@1", "--out", str(tmp_path / "m"))
    assert missing.returncode == 1 and missing.stderr.strip() == "error: adapter zz@1 not found"
