"""Checks that a PEFT LoRA adapter directory is complete, safe to load and fits the served base model."""

import json
from dataclasses import dataclass
from pathlib import Path

from .basemodel import BaseModel, read_safetensors_header

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_FLOAT_DTYPES = {"F32", "F16", "BF16"}


class InvalidAdapter(ValueError):
    """The adapter cannot be registered or served; the message says why."""


@dataclass(frozen=True)
class AdapterInfo:
    rank: int
    alpha: float
    target_modules: list[str]
    declared_base: str | None


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise InvalidAdapter(f"{CONFIG_FILE} is missing")
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapter(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") != "LORA":
        raise InvalidAdapter(f"{CONFIG_FILE}: peft_type must be \"LORA\"")
    if config.get("use_dora"):
        raise InvalidAdapter(f"{CONFIG_FILE}: DoRA adapters are not supported by the engine")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise InvalidAdapter(f"{CONFIG_FILE}: r must be a positive integer")
    return config


def _lora_tensors(header: dict) -> dict[str, dict[str, dict]]:
    """Groups tensors by base module: {module: {"A": meta, "B": meta}}."""
    modules: dict[str, dict[str, dict]] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        for kind in ("A", "B"):
            suffix = f".lora_{kind}.weight"
            if name.startswith(_PREFIX) and name.endswith(suffix):
                modules.setdefault(name[len(_PREFIX): -len(suffix)], {})[kind] = meta
                break
        else:
            raise InvalidAdapter(f"{WEIGHTS_FILE}: unexpected tensor {name!r} (only lora_A/lora_B weights are served)")
    return modules


def _check_finite(path: Path) -> None:
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        for name in f.keys():
            if not torch.isfinite(f.get_tensor(name)).all():
                raise InvalidAdapter(f"{WEIGHTS_FILE}: tensor {name!r} has NaN or infinite values")


def check_adapter(directory: Path, base: BaseModel, max_rank: int) -> AdapterInfo:
    """Validates config and tensors against the base model's linear shapes and the engine's rank limit."""
    directory = Path(directory)
    config = _read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise InvalidAdapter(f"{WEIGHTS_FILE} is missing (only safetensors weights are accepted)")
    try:
        header, _ = read_safetensors_header(weights)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidAdapter(f"{WEIGHTS_FILE}: {e}") from None
    modules = _lora_tensors(header)
    if not modules:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA tensors")
    rank = 0
    for module, pair in sorted(modules.items()):
        if set(pair) != {"A", "B"}:
            raise InvalidAdapter(f"{WEIGHTS_FILE}: {module} lacks lora_A or lora_B")
        base_shape = base.linear_shape(module)
        if base_shape is None or len(base_shape) != 2:
            raise InvalidAdapter(f"target module {module!r} does not exist in the base model")
        out_features, in_features = base_shape
        a, b = pair["A"], pair["B"]
        if a.get("dtype") not in _FLOAT_DTYPES or b.get("dtype") not in _FLOAT_DTYPES:
            raise InvalidAdapter(f"{WEIGHTS_FILE}: {module} tensors must be F32, F16 or BF16")
        r = a["shape"][0] if len(a.get("shape", [])) == 2 else -1
        if list(a["shape"]) != [r, in_features] or list(b.get("shape", [])) != [out_features, r]:
            raise InvalidAdapter(
                f"{WEIGHTS_FILE}: {module} shapes A{a['shape']} B{b.get('shape')} do not fit "
                f"base weight [{out_features}, {in_features}]"
            )
        rank = max(rank, r)
    if rank > max_rank:
        raise InvalidAdapter(f"LoRA rank {rank} exceeds the engine's limit of {max_rank}")
    _check_finite(weights)
    return AdapterInfo(
        rank=rank,
        alpha=float(config.get("lora_alpha", rank)),
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
        declared_base=config.get("base_model_name_or_path"),
    )
