import pytest
import torch

from server.registry.validation import InvalidAdapter, check_adapter

Q = "model.layers.0.self_attn.q_proj"
UP = "model.layers.0.mlp.up_proj"


def test_valid_adapter(base, adapter_factory):
    info = check_adapter(adapter_factory(rank=4, modules=(Q, UP)), base, max_rank=8)
    assert (info.rank, info.alpha, info.target_modules) == (4, 8.0, ["q_proj", "up_proj"])


@pytest.mark.parametrize("kw,message", [
    (dict(rank=16), "exceeds the engine's limit of 8"),
    (dict(config={"peft_type": "IA3"}), "peft_type"),
    (dict(config={"use_dora": True}), "DoRA"),
    (dict(config={"r": 0}), "positive integer"),
    (dict(tensors={f"base_model.model.{Q}.lora_A.weight": torch.ones(4, 8)}), "lacks lora_A or lora_B"),
    (dict(tensors={f"base_model.model.{Q}.lora_A.weight": torch.ones(4, 9),
                   f"base_model.model.{Q}.lora_B.weight": torch.ones(8, 4)}), "do not fit"),
    (dict(tensors={"base_model.model.model.layers.0.nope.lora_A.weight": torch.ones(4, 8),
                   "base_model.model.model.layers.0.nope.lora_B.weight": torch.ones(8, 4)}), "does not exist"),
    (dict(tensors={f"base_model.model.{Q}.lora_A.weight": torch.full((4, 8), float("nan")),
                   f"base_model.model.{Q}.lora_B.weight": torch.ones(8, 4)}), "NaN"),
    (dict(tensors={f"base_model.model.{Q}.lora_A.weight": torch.ones(4, 8, dtype=torch.int32),
                   f"base_model.model.{Q}.lora_B.weight": torch.ones(8, 4)}), "F32, F16 or BF16"),
    (dict(tensors={"base_model.model.lm_head.weight": torch.ones(2, 2)}), "unexpected tensor"),
    (dict(tensors={}), "no LoRA tensors"),
    (dict(config={"base_model_name_or_path": "org/other-model"}), "declares base model 'org/other-model'"),
])
def test_rejections(base, adapter_factory, kw, message):
    with pytest.raises(InvalidAdapter, match=message):
        check_adapter(adapter_factory(**kw), base, max_rank=8)


def test_missing_and_corrupt_files(base, adapter_factory):
    d = adapter_factory()
    (d / "adapter_model.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(InvalidAdapter, match="not a valid safetensors file.*header too small"):
        check_adapter(d, base, max_rank=8)
    (d / "adapter_model.safetensors").unlink()
    (d / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(InvalidAdapter, match="only safetensors"):
        check_adapter(d, base, max_rank=8)
    (d / "adapter_config.json").write_text("{not json")
    with pytest.raises(InvalidAdapter, match="not valid JSON"):
        check_adapter(d, base, max_rank=8)


def test_fingerprint_tracks_weights(tmp_path, base):
    from safetensors.torch import save_file

    from server.core import base_model as basemodel

    again = basemodel.load(str(base.path))
    assert again.fingerprint == base.fingerprint
    save_file({"model.layers.0.self_attn.q_proj.weight": torch.ones(8, 8)}, base.path / "model.safetensors")
    assert basemodel.load(str(base.path)).fingerprint != base.fingerprint


def test_declared_base_may_be_hub_id_or_path(base, adapter_factory):
    for declared in ("some-org/base", str(base.path), "BASE", None):
        info = check_adapter(adapter_factory(config={"base_model_name_or_path": declared}), base, max_rank=8)
        assert info.declared_base == declared


def test_exported_manifest_must_carry_the_served_fingerprint(base, adapter_factory):
    import json

    from server.registry.validation import check_exported_manifest

    d = adapter_factory()
    check_exported_manifest(d, base)  # no manifest: nothing to compare
    (d / "manifest.json").write_text(json.dumps({"base_fingerprint": base.fingerprint}))
    check_exported_manifest(d, base)
    (d / "manifest.json").write_text(json.dumps({"base_fingerprint": "f" * 64}))
    with pytest.raises(InvalidAdapter, match="fingerprint"):
        check_exported_manifest(d, base)


@pytest.mark.parametrize("config,message", [
    ({"lora_alpha": "16"}, "lora_alpha must be a finite positive number"),
    ({"lora_alpha": 10**400}, "lora_alpha must be a finite positive number"),
    ({"lora_alpha": -1}, "lora_alpha must be a finite positive number"),
    ({"base_model_name_or_path": ["a", "b"]}, "base_model_name_or_path must be a string"),
    ({"r": 8}, "r is 8, but"),
])
def test_hostile_config_values_are_refused(base, adapter_factory, config, message):
    """Hardening review: these were 500s on upload (a string or 10**400 alpha, a list as base model)."""
    with pytest.raises(InvalidAdapter, match=message):
        check_adapter(adapter_factory(config=config), base, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [None, float("inf"), float("-inf"), float("nan")])
def test_non_finite_values_are_found_in_every_float_dtype(base, adapter_factory, dtype, bad):
    """The check reads raw bytes with numpy (bfloat16 through its exponent bits), without torch."""
    a = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    tensors = {a: torch.randn(4, 8).to(dtype), b: torch.randn(8, 4).to(dtype)}
    if bad is not None:
        tensors[b][3, 1] = bad
    src = adapter_factory(tensors=tensors)
    if bad is None:
        assert check_adapter(src, base, 64).rank == 4
    else:
        with pytest.raises(InvalidAdapter, match="NaN or infinite"):
            check_adapter(src, base, 64)
