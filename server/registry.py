"""The adapter registry: versioned PEFT adapters with manifests and aliases, written atomically.

Layout: ROOT/NAME/VERSION/{adapter_config.json, adapter_model.safetensors, manifest.json} and
ROOT/NAME/state.json (aliases, next version). A version directory appears by one rename, complete.
"""

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock

from .basemodel import BaseModel
from .validation import CONFIG_FILE, WEIGHTS_FILE, check_adapter

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
# Aliases start with a letter so that "name@3" is always a version and "name@stable" an alias.
ALIAS_RE = re.compile(r"^[a-z][a-z0-9._-]{0,63}$")
LATEST = "latest"
MANIFEST_FILE = "manifest.json"
STATE_FILE = "state.json"


class RegistryError(Exception):
    """Base of the registry's errors."""


class InvalidReference(RegistryError, ValueError):
    """An adapter reference or name that does not parse."""


class NotFound(RegistryError, LookupError):
    """No such adapter, version or alias."""


@dataclass(frozen=True)
class Ref:
    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}@{self.alias}" if self.alias else self.name


@dataclass(frozen=True)
class Version:
    name: str
    version: int
    path: Path
    manifest: dict

    @property
    def key(self) -> str:
        """The name the version is loaded under in an engine, and answered as."""
        return f"{self.name}@{self.version}"


def check_name(name: str, what: str = "name") -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidReference(f"invalid adapter {what} {name!r}: must match {NAME_RE.pattern}")
    return name


def parse_ref(text: str) -> Ref:
    """Parses "name", "name@3" or "name@alias"."""
    if not isinstance(text, str):
        raise InvalidReference("adapter must be a string")
    name, sep, selector = text.partition("@")
    check_name(name)
    if not sep:
        return Ref(name)
    if selector.isdigit() and int(selector) > 0 and not selector.startswith("0"):
        return Ref(name, version=int(selector))
    if ALIAS_RE.match(selector):
        return Ref(name, alias=selector)
    raise InvalidReference(f"invalid adapter reference {text!r}: expected name, name@VERSION or name@ALIAS")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class Registry:
    def __init__(self, root: Path):
        self.root = Path(root)
        self._manifests: dict[tuple[str, int, int], dict] = {}

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if NAME_RE.match(p.name) and self.versions(p.name))

    def versions(self, name: str) -> list[int]:
        try:
            entries = os.scandir(self.root / check_name(name))
        except (FileNotFoundError, NotADirectoryError):
            return []
        with entries:
            return sorted(int(e.name) for e in entries if e.name.isdigit() and e.is_dir())

    def _state(self, name: str) -> dict:
        try:
            return json.loads((self.root / name / STATE_FILE).read_text())
        except FileNotFoundError:
            return {"aliases": {}, "next_version": 1}

    def aliases(self, name: str) -> dict[str, int]:
        """Stored aliases that point at an existing version, plus `latest`."""
        versions = self.versions(name)
        if not versions:
            raise NotFound(f"adapter {name!r} not found")
        present = set(versions)
        aliases = {a: v for a, v in self._state(name)["aliases"].items() if v in present}
        aliases[LATEST] = versions[-1]
        return aliases

    def resolve(self, ref: Ref | str) -> Version:
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.version is not None:
            version = ref.version
        else:
            version = self.aliases(ref.name).get(ref.alias or LATEST)
            if version is None:
                raise NotFound(f"adapter {ref.name!r} has no alias {ref.alias!r}")
        return self.get(ref.name, version)

    def get(self, name: str, version: int) -> Version:
        path = self.root / check_name(name) / str(version)
        try:
            stamp = (path / MANIFEST_FILE).stat().st_mtime_ns
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"adapter {name}@{version} not found") from None
        # Versions are immutable once renamed into place, so a manifest read once stays valid.
        manifest = self._manifests.get((name, version, stamp))
        if manifest is None:
            manifest = json.loads((path / MANIFEST_FILE).read_text())
            self._manifests[(name, version, stamp)] = manifest
        return Version(name, version, path, manifest)

    def register(self, name: str, source: Path, *, base: BaseModel, base_model: str, max_rank: int,
                 tenant: str = "default", origin: str = "cli", public: bool = False,
                 extra: dict | None = None) -> Version:
        """Copies, validates and publishes `source` as the next version of `name`; all or nothing."""
        check_name(name)
        check_name(tenant, "tenant")
        source = Path(source)
        adapter_dir = self.root / name
        adapter_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=adapter_dir))
        staging.chmod(0o755)  # mkdtemp makes it private; engines may run as another user
        try:
            # Validate the copy, not the source, so what is checked is exactly what is published.
            for fname in (CONFIG_FILE, WEIGHTS_FILE):
                if (source / fname).is_file():
                    shutil.copyfile(source / fname, staging / fname)
            info = check_adapter(staging, base, max_rank)
            files = {}
            for fname in (CONFIG_FILE, WEIGHTS_FILE):
                with open(staging / fname, "rb") as f:
                    os.fsync(f.fileno())
                files[fname] = {"sha256": sha256_file(staging / fname), "size": (staging / fname).stat().st_size}
            with FileLock(adapter_dir / ".lock"):
                state = self._state(name)
                version = max([state.get("next_version", 1), *(v + 1 for v in self.versions(name))])
                manifest = {
                    "name": name, "version": version, "tenant": tenant, "public": public,
                    "base_model": base_model, "base_fingerprint": base.fingerprint,
                    "declared_base_model": info.declared_base,
                    "rank": info.rank, "alpha": info.alpha, "target_modules": info.target_modules,
                    "files": files, "created": time.time(), "source": origin,
                    **(extra or {}),
                }
                write_json_atomic(staging / MANIFEST_FILE, manifest)
                _fsync_dir(staging)
                os.rename(staging, adapter_dir / str(version))
                _fsync_dir(adapter_dir)
                state["next_version"] = version + 1
                write_json_atomic(adapter_dir / STATE_FILE, state)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return self.get(name, version)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        if not ALIAS_RE.match(alias) or alias == LATEST:
            raise InvalidReference(f"invalid alias {alias!r}: must match {ALIAS_RE.pattern} and not be {LATEST!r}")
        self.get(name, version)
        adapter_dir = self.root / name
        with FileLock(adapter_dir / ".lock"):
            state = self._state(name)
            state["aliases"][alias] = version
            write_json_atomic(adapter_dir / STATE_FILE, state)
