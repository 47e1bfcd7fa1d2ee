"""Checks that a PEFT LoRA adapter directory is complete, safe to load and fits the served base model."""

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from server.core.base_model import BaseModelInfo

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_FLOAT_DTYPES = {"F32", "F16", "BF16"}


class InvalidAdapter(ValueError):
    """The adapter cannot be registered or served; the message says why."""


def shown(text: str, limit: int = 80) -> str:
    """A name taken from the adapter's files, quoted and cut short for a message."""
    return repr(text if len(text) <= limit else text[:limit] + "...")


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
    r, alpha = config.get("r"), config.get("lora_alpha", config.get("r"))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise InvalidAdapter(f"{CONFIG_FILE}: r must be a positive integer")
    if not _positive_finite(alpha):
        raise InvalidAdapter(f"{CONFIG_FILE}: lora_alpha must be a finite positive number")
    declared = config.get("base_model_name_or_path")
    if declared is not None and not isinstance(declared, str):
        raise InvalidAdapter(f"{CONFIG_FILE}: base_model_name_or_path must be a string")
    return config


def _positive_finite(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:  # an integer too large for a float, 10**400 say
        return False


def _tensor_meta(path: Path) -> dict[str, dict]:
    """{name: {"dtype", "shape", "data_offsets"}} once safetensors itself has checked the file, so a malformed
    header, offsets that overlap or run past the end, or a truncated file are refused as the engine's loader would.
    numpy, not torch: the CLI that registers adapters starts in a fraction of the time."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            names = set(f.keys())
        with open(path, "rb") as f:
            size = struct.unpack("<Q", f.read(8))[0]
            header = json.loads(f.read(size))
    except (SafetensorError, OSError, ValueError, struct.error) as e:
        raise InvalidAdapter(f"{WEIGHTS_FILE}: not a valid safetensors file ({e})") from None
    return {name: {**header[name], "start": 8 + size} for name in names}


def _lora_tensors(meta: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """Groups tensors by base module: {module: {"A": meta, "B": meta}}."""
    modules: dict[str, dict[str, dict]] = {}
    for name, tensor in meta.items():
        for kind in ("A", "B"):
            suffix = f".lora_{kind}.weight"
            if name.startswith(_PREFIX) and name.endswith(suffix):
                modules.setdefault(name[len(_PREFIX): -len(suffix)], {})[kind] = tensor
                break
        else:
            raise InvalidAdapter(f"{WEIGHTS_FILE}: unexpected tensor {shown(name)} "
                                 "(only lora_A/lora_B weights are served)")
    return modules


# bfloat16, which numpy lacks, is read as uint16: a value is NaN or infinite when its 8 exponent bits are all set.
_BF16_EXPONENT = 0x7F80


def _check_finite(path: Path, meta: dict[str, dict]) -> None:
    import numpy as np

    data = np.memmap(path, dtype=np.uint8, mode="r")
    for name, tensor in meta.items():
        start, end = (tensor["start"] + offset for offset in tensor["data_offsets"])
        raw = data[start:end]
        if tensor["dtype"] == "BF16":
            finite = not ((raw.view(np.uint16) & _BF16_EXPONENT) == _BF16_EXPONENT).any()
        else:
            finite = bool(np.isfinite(raw.view(np.float32 if tensor["dtype"] == "F32" else np.float16)).all())
        if not finite:
            raise InvalidAdapter(f"{WEIGHTS_FILE}: tensor {shown(name)} has NaN or infinite values")


def _module_rank(module: str, pair: dict[str, dict], base: BaseModelInfo, config: dict) -> int:
    """The rank of one module's lora_A/lora_B pair, once its shapes fit the base weight and its dtypes are floats."""
    if set(pair) != {"A", "B"}:
        raise InvalidAdapter(f"{WEIGHTS_FILE}: {module} lacks lora_A or lora_B")
    base_shape = base.linear_shape(module)
    if base_shape is None or len(base_shape) != 2:
        raise InvalidAdapter(f"target module {shown(module)} does not exist in the base model")
    out_features, in_features = base_shape
    a, b = pair["A"], pair["B"]
    if a["dtype"] not in _FLOAT_DTYPES or b["dtype"] not in _FLOAT_DTYPES:
        raise InvalidAdapter(f"{WEIGHTS_FILE}: {module} tensors must be F32, F16 or BF16")
    r = a["shape"][0] if len(a["shape"]) == 2 else -1
    if list(a["shape"]) != [r, in_features] or list(b["shape"]) != [out_features, r]:
        raise InvalidAdapter(
            f"{WEIGHTS_FILE}: {module} shapes A{a['shape']} B{b.get('shape')} do not fit "
            f"base weight [{out_features}, {in_features}]"
        )
    if r != config["r"] and not config.get("rank_pattern"):
        raise InvalidAdapter(f"{CONFIG_FILE}: r is {config['r']}, but {module} has rank {r}")
    return r


def check_adapter(directory: Path, base: BaseModelInfo, max_rank: int) -> AdapterInfo:
    """Validates config and tensors against the base model's linear shapes and the engine's rank limit."""
    directory = Path(directory)
    config = _read_config(directory)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise InvalidAdapter(f"{WEIGHTS_FILE} is missing (only safetensors weights are accepted)")
    meta = _tensor_meta(weights)
    modules = _lora_tensors(meta)
    if not modules:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA tensors")
    rank = max(_module_rank(module, pair, base, config) for module, pair in sorted(modules.items()))
    if rank > max_rank:
        raise InvalidAdapter(f"LoRA rank {rank} exceeds the engine's limit of {max_rank}")
    declared = config.get("base_model_name_or_path")
    if declared and not base.answers_to(declared):
        raise InvalidAdapter(f"{CONFIG_FILE} declares base model {shown(declared)}; this server serves {base.name!r}")
    _check_finite(weights, meta)
    return AdapterInfo(
        rank=rank,
        alpha=float(config.get("lora_alpha", rank)),
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
        declared_base=config.get("base_model_name_or_path"),
    )


MANIFEST_FILE = "manifest.json"
def check_exported_manifest(directory: Path, base: BaseModelInfo) -> None:
    """An archive exported from a registry carries its manifest: its base fingerprint must be the served one."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        return
    try:
        fingerprint = json.loads(path.read_text()).get("base_fingerprint")
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        raise InvalidAdapter(f"{MANIFEST_FILE} is not a JSON object") from None
    if fingerprint is not None and fingerprint != base.fingerprint:
        raise InvalidAdapter(f"{MANIFEST_FILE} says the adapter was made for base model fingerprint "
                             f"{str(fingerprint)[:12]}..., not the served {base.fingerprint[:12]}...")
