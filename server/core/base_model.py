"""What the gateway knows about the base model without loading it: its files, fingerprint and linear shapes."""

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path

# Keys that change with the tool that saved the model, not with the model.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "transformers_version", "torch_dtype", "dtype"}
_SAMPLED_BYTES = 1 << 20


@dataclass(frozen=True)
class BaseModelInfo:
    name: str
    path: Path
    fingerprint: str
    weight_shapes: dict[str, tuple[int, ...]]
    context_len: int | None = None

    def linear_shape(self, module: str) -> tuple[int, ...] | None:
        return self.weight_shapes.get(f"{module}.weight")

    def answers_to(self, declared: str) -> bool:
        """Whether a declared base model (hub id or path) names this one; only the last part is compared,
        since one model is often a hub id in one place and a local directory in another."""
        def last(s: str) -> str:
            return s.rstrip("/").rsplit("/", 1)[-1].lower()

        return last(declared) in {last(self.name), last(str(self.path))}


def local_dir(base_model: str) -> Path:
    """The model's local directory; a hub id is fetched (config, tokenizer, safetensors) into the HF cache."""
    path = Path(base_model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(base_model, allow_patterns=["*.json", "*.safetensors", "tokenizer*"]))


def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset where tensor data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path.name}: truncated safetensors file")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * (1 << 20) or size > path.stat().st_size - 8:
            raise ValueError(f"{path.name}: safetensors header size {size} is not plausible")
        header = json.loads(f.read(size))
    if not isinstance(header, dict):
        raise ValueError(f"{path.name}: safetensors header is not an object")
    return header, 8 + size


class Unreadable(ValueError):
    """The base model's files cannot be read (permissions, a missing file): one line naming the path and why."""


def load(base_model: str) -> BaseModelInfo:
    """Reads config, tokenizer and safetensors headers; hashes them with a sample of the weights."""
    path = local_dir(base_model)
    try:
        return _load(base_model, path)
    except OSError as e:
        raise Unreadable(f"base model {path}: cannot read {e.filename or path}: {e.strerror or e}") from None


def _load(base_model: str, path: Path) -> BaseModelInfo:
    h = hashlib.sha256()
    config = json.loads((path / "config.json").read_text())
    h.update(json.dumps({k: v for k, v in config.items() if k not in _VOLATILE_CONFIG_KEYS},
                        sort_keys=True).encode())
    tokenizer = path / "tokenizer.json"
    if tokenizer.exists():
        h.update(tokenizer.read_bytes())
    shapes: dict[str, tuple[int, ...]] = {}
    for weights in sorted(path.glob("*.safetensors")):
        header, start = read_safetensors_header(weights)
        header.pop("__metadata__", None)
        h.update(json.dumps(header, sort_keys=True).encode())
        with open(weights, "rb") as f:
            f.seek(start)
            h.update(f.read(_SAMPLED_BYTES))
        shapes.update({name: tuple(t["shape"]) for name, t in header.items()})
    return BaseModelInfo(name=base_model, path=path, fingerprint=h.hexdigest(), weight_shapes=shapes,
                     context_len=config.get("max_position_embeddings"))
