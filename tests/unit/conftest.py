import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from fastapi.testclient import TestClient

from server.core import base_model as basemodel
from server.core.config import Settings
from server.gateway.app import create_app
from server.store.documents import FileDocument
from server.tenancy.keys import KEYS_FILE, KeyStore

HIDDEN, INTER = 8, 12
# Linear weights of a one-layer Llama-shaped model: {module: (out_features, in_features)}.
LINEARS = {
    "model.layers.0.self_attn.q_proj": (HIDDEN, HIDDEN),
    "model.layers.0.self_attn.v_proj": (HIDDEN, HIDDEN),
    "model.layers.0.mlp.up_proj": (INTER, HIDDEN),
}


@pytest.fixture
def base(tmp_path: Path) -> basemodel.BaseModelInfo:
    d = tmp_path / "base"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    save_file({f"{m}.weight": torch.zeros(shape) for m, shape in LINEARS.items()}, d / "model.safetensors")
    return basemodel.load(str(d))


def write_adapter(path: Path, rank: int = 4, modules=("model.layers.0.self_attn.q_proj",), config=None,
                  tensors=None, seed: int = 0) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "base_model_name_or_path": "base",
           "target_modules": [m.rsplit(".", 1)[-1] for m in modules]}
    cfg.update(config or {})
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    if tensors is None:
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for m in modules:
            out_f, in_f = LINEARS[m]
            tensors[f"base_model.model.{m}.lora_A.weight"] = torch.randn(rank, in_f, generator=g)
            tensors[f"base_model.model.{m}.lora_B.weight"] = torch.randn(out_f, rank, generator=g)
    save_file(tensors, path / "adapter_model.safetensors")
    return path


@pytest.fixture
def adapter_factory(tmp_path: Path):
    counter = iter(range(10_000))

    def make(**kw) -> Path:
        return write_adapter(tmp_path / f"src{next(counter)}", **kw)

    return make


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    """The app without its lifespan: answers what needs no engine (validation, CORS, the key check)."""
    # No `with`: the lifespan (and so the engine) never starts; validation answers before any handler runs,
    # and only the key check, which runs first, needs part of the gateway.
    app = create_app(Settings(state_dir=tmp_path, registry=tmp_path / "r"))
    app.state.access = SimpleNamespace(keys=KeyStore(FileDocument(tmp_path / KEYS_FILE)))
    return TestClient(app)
