"""Checks that a PEFT LoRA adapter directory is complete, safe to load and fits the served base model."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from .basemodel import BaseModel

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


def _tensor_meta(path: Path) -> dict[str, dict]:
    """{name: {"dtype", "shape"}} as safetensors itself parses the file, so a malformed header, offsets that
    overlap or run past the end, or a truncated file are refused exactly as the engine's loader would."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return {name: {"dtype": f.get_slice(name).get_dtype(), "shape": f.get_slice(name).get_shape()}
                    for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise InvalidAdapter(f"{WEIGHTS_FILE}: not a valid safetensors file ({e})") from None


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
    modules = _lora_tensors(_tensor_meta(weights))
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
        if a["dtype"] not in _FLOAT_DTYPES or b["dtype"] not in _FLOAT_DTYPES:
            raise InvalidAdapter(f"{WEIGHTS_FILE}: {module} tensors must be F32, F16 or BF16")
        r = a["shape"][0] if len(a["shape"]) == 2 else -1
        if list(a["shape"]) != [r, in_features] or list(b["shape"]) != [out_features, r]:
            raise InvalidAdapter(
                f"{WEIGHTS_FILE}: {module} shapes A{a['shape']} B{b.get('shape')} do not fit "
                f"base weight [{out_features}, {in_features}]"
            )
        rank = max(rank, r)
    if rank > max_rank:
        raise InvalidAdapter(f"LoRA rank {rank} exceeds the engine's limit of {max_rank}")
    declared = config.get("base_model_name_or_path")
    if declared and not base.answers_to(declared):
        raise InvalidAdapter(f"{CONFIG_FILE} declares base model {declared!r}; this server serves {base.name!r}")
    _check_finite(weights)
    return AdapterInfo(
        rank=rank,
        alpha=float(config.get("lora_alpha", rank)),
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}),
        declared_base=config.get("base_model_name_or_path"),
    )


MANIFEST_FILE = "manifest.json"
ALLOWED_FILES = {CONFIG_FILE, WEIGHTS_FILE, "README.md", MANIFEST_FILE}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass(frozen=True)
class _Member:
    name: str
    size: int
    kind: str  # "file", "dir" or what else it is


def _member_name(raw: str) -> str:
    """The member's file name once a single top-level folder is allowed for; refuses unsafe paths."""
    if not raw or raw.startswith(("/", "\\")) or "\\" in raw or ":" in raw.split("/")[0]:
        raise InvalidAdapter(f"archive member {raw!r} has an absolute or unsafe path")
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise InvalidAdapter(f"archive member {raw!r} points outside the archive (..)")
    if len(parts) > 2:
        raise InvalidAdapter(f"archive member {raw!r} is nested too deep (files must be at the top or in one folder)")
    return "/".join(parts)


def _tar_members(tar) -> list[tuple[_Member, object]]:
    out = []
    for m in tar.getmembers():
        kind = "file" if m.isreg() else "dir" if m.isdir() else "link" if (m.issym() or m.islnk()) else "special"
        out.append((_Member(m.name, m.size, kind), m))
    return out


def _zip_members(zf) -> list[tuple[_Member, object]]:
    import stat

    out = []
    for info in zf.infolist():
        mode = info.external_attr >> 16
        # Zips made off Unix carry no file type bits; those entries are plain files.
        kind = ("dir" if info.is_dir() else "link" if stat.S_ISLNK(mode)
                else "special" if stat.S_IFMT(mode) and not stat.S_ISREG(mode) else "file")
        out.append((_Member(info.filename, info.file_size, kind), info))
    return out


def pack_archive(directory: Path) -> bytes:
    """The adapter files of `directory` as the .tar.gz that `unpack_archive` (the admin upload) takes."""
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name in sorted(ALLOWED_FILES):
            if (directory / name).is_file():
                tar.add(directory / name, arcname=name)
    return buf.getvalue()


def unpack_archive(archive: BinaryIO, dest: Path, max_members: int, max_bytes: int) -> None:
    """Extracts a .tar.gz/.tgz/.zip adapter archive (a binary file) into `dest`, refusing anything unsafe."""
    import tarfile
    import zipfile
    import zlib

    if zipfile.is_zipfile(archive):
        archive.seek(0)
        try:
            container = zipfile.ZipFile(archive)
        except zipfile.BadZipFile as e:
            raise InvalidAdapter(f"archive is corrupt: {e}") from None
        members = _zip_members(container)
        opener = container.open
    else:
        archive.seek(0)
        try:
            container = tarfile.open(fileobj=archive, mode="r:*")
        except (tarfile.TarError, EOFError, OSError):
            raise InvalidAdapter("file must be a .tar.gz, .tgz or .zip archive") from None
        try:
            members = _tar_members(container)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise InvalidAdapter(f"archive is corrupt: {e}") from None
        opener = container.extractfile
    with container:
        if len(members) > max_members:
            raise InvalidAdapter(f"archive has {len(members)} members; at most {max_members} are allowed")
        if sum(m.size for m, _ in members) > max_bytes:
            raise InvalidAdapter(f"archive unpacks to more than {max_bytes} bytes")
        files: dict[str, tuple[_Member, object]] = {}
        for member, handle in members:
            name = _member_name(member.name)
            if member.kind in ("link", "special"):
                raise InvalidAdapter(f"archive member {member.name!r} is a {member.kind}; only regular files are accepted")
            if member.kind == "dir":
                continue
            base = name.rsplit("/", 1)[-1]
            if base.endswith(_PICKLE_SUFFIXES):
                raise InvalidAdapter(f"archive member {member.name!r}: only safetensors weights are accepted, "
                                     "not pickled (.bin/.pt) ones")
            if base not in ALLOWED_FILES:
                raise InvalidAdapter(f"archive member {member.name!r} is not part of a PEFT adapter "
                                     f"(allowed: {', '.join(sorted(ALLOWED_FILES))})")
            if base in files:
                raise InvalidAdapter(f"archive holds {base} twice")
            files[base] = (member, handle)
        written = 0
        try:
            for base, (member, handle) in files.items():
                # Count real bytes too: a zip's declared sizes can lie.
                with opener(handle) as src, open(dest / base, "xb") as out:
                    while block := src.read(1 << 20):
                        written += len(block)
                        if written > max_bytes:
                            raise InvalidAdapter(f"archive unpacks to more than {max_bytes} bytes")
                        out.write(block)
        except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError) as e:
            raise InvalidAdapter(f"archive is corrupt: {e}") from None


def check_exported_manifest(directory: Path, base: BaseModel) -> None:
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
