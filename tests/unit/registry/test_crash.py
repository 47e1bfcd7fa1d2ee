import random
import signal
import subprocess
import sys
import time

from server.registry.directory import DirectoryRegistry

WRITER = """
import sys
from server.core import base_model as basemodel
from server.registry.directory import DirectoryRegistry
base = basemodel.load(sys.argv[1])
reg = DirectoryRegistry(sys.argv[2])
first = True
while True:
    v = reg.register("acme", sys.argv[3], base=base, max_rank=64)
    reg.set_alias("acme", "stable", v.version)
    if first:  # warmed up (imports done): from here on, kills land inside the registration loop
        print("ready", flush=True)
        first = False
"""


def test_kill_at_any_moment_leaves_a_clean_registry(tmp_path, base, adapter_factory):
    """SIGKILL a process that registers versions in a loop, many times at random moments."""
    src = adapter_factory(rank=16, modules=("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj"))
    root = tmp_path / "reg"
    rng = random.Random()
    kills = 0
    for _ in range(8):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(base.path), str(root), str(src)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
    reg = DirectoryRegistry(root)
    problems, notes = reg.check()
    assert problems == []
    versions = reg.versions("acme")
    assert versions, "no version was ever completed"
    for v in versions:
        assert reg.get("acme", v).manifest["version"] == v
    assert reg.resolve("acme").version == versions[-1]
    # a later registration still works and takes a fresh number
    assert reg.register("acme", src, base=base, max_rank=64).version > versions[-1]
    assert kills == 8
    print(f"{kills} kills, {len(versions)} complete versions, {len(notes)} interrupted writes left aside")
