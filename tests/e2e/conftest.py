"""One real gateway + vLLM engine per test session, started the way `make serve` starts it."""

import os
import random
import subprocess
from pathlib import Path

import httpx
import pytest

from loadtest.adapters import ALL_LINEAR, AdapterFactory
from loadtest.servers import Gateway
from server.trainer.demo_model import build
from tests.helpers.calls import Output
from tests.helpers.e2e import ADMIN_TOKEN, LOADER, Server
from tests.helpers.training import write_job

# Different ranks and target modules; seeds are drawn per run so the tests cannot know the weights in advance.
ADAPTERS = {
    "alpha": (8, ["q_proj", "v_proj"]),
    "beta": (16, ALL_LINEAR),
    "gamma": (32, ["o_proj", "up_proj", "down_proj"]),
}


@pytest.fixture(scope="session")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def base_model(workdir) -> Path:
    return build(workdir / "demo-base", steps=60, log=lambda *_: None)


@pytest.fixture(scope="session")
def adapter_dirs(workdir, base_model) -> dict[str, Path]:
    rng = random.SystemRandom()
    dirs = {}
    for name, (rank, targets) in ADAPTERS.items():
        seed = rng.randrange(2**31)
        print(f"adapter {name}: rank {rank} targets {targets} seed {seed}")
        dirs[name] = AdapterFactory(base_model, rank, targets).write(workdir / "src" / name, seed)
    return dirs


@pytest.fixture(scope="session")
def server(workdir, base_model, adapter_dirs):
    env = {
        "LORAPLEX_BASE_MODEL": str(base_model),
        "LORAPLEX_REGISTRY": str(workdir / "registry"),
        "LORAPLEX_MAX_LORAS": "2",
        "LORAPLEX_MAX_LORA_RANK": "64",  # the adapters go up to rank 32, and a rank-128 upload must be refused
        "LORAPLEX_MAX_RESIDENT_ADAPTERS": "2",  # fewer than the adapters used, so eviction is exercised
        "LORAPLEX_STATE_DIR": str(workdir / "state"),
        "LORAPLEX_ADMIN_TOKEN": ADMIN_TOKEN,
        "LORAPLEX_MAX_UPLOAD_BYTES": str(8 << 20),
    }
    for name in ("alpha", "beta"):  # gamma is registered while the server runs
        r = subprocess.run([*LOADER, "adapters", "add", name, str(adapter_dirs[name]), "--tenant", "acme"],
                           env={**os.environ, **env}, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
    gateway = Gateway(env, workdir / "serve.log")
    try:
        yield Server(gateway, adapter_dirs)
    finally:
        gateway.stop()


@pytest.fixture(scope="session")
def trained(server, workdir, base_model) -> subprocess.CompletedProcess:
    """The demo job, run once with `promote: auto` and registered into the session's registry as trained@1 (tenant
    nimbus): the `loraplex train` run, which must have succeeded."""
    r = server.cli("train", str(write_job(workdir, base_model, "trained", promote="auto", max_forgetting=10.0)),
                   timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


class Reference:
    """Greedy generations of PEFT + transformers in float32, the outputs the engine must reproduce."""

    def __init__(self, base_dir: Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.base_dir = base_dir
        self.tokenizer = AutoTokenizer.from_pretrained(base_dir)
        self.models = {None: AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()}

    def _model(self, adapter_dir: Path | None):
        if adapter_dir not in self.models:
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            base = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=self.torch.float32)
            self.models[adapter_dir] = PeftModel.from_pretrained(base, adapter_dir).eval()
        return self.models[adapter_dir]

    def _generate(self, adapter_dir, ids: list[int], max_tokens: int) -> "Output":
        with self.torch.no_grad():
            out = self._model(adapter_dir).generate(
                input_ids=self.torch.tensor([ids]), attention_mask=self.torch.ones(1, len(ids), dtype=self.torch.long),
                max_new_tokens=max_tokens, do_sample=False,
            )
        new = out[0][len(ids):].tolist()
        return Output(new, self.tokenizer.decode(new, skip_special_tokens=True))

    def complete(self, adapter_dir, prompt: str, max_tokens: int) -> "Output":
        return self._generate(adapter_dir, self.tokenizer(prompt)["input_ids"], max_tokens)

    def chat(self, adapter_dir, messages: list[dict], max_tokens: int) -> "Output":
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return self._generate(adapter_dir, ids, max_tokens)


@pytest.fixture(scope="session")
def reference(base_model) -> Reference:
    return Reference(base_model)


@pytest.fixture
def admin(server):
    with httpx.Client(base_url=server.url, timeout=300, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as c:
        yield c


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=300) as c:
        yield c
