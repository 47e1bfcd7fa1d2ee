"""A version's manifest: staging and validating its files, and checking a stored version against it."""

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from server.core.base_model import BaseModelInfo
from server.core.digest import sha256_file
from server.registry.validation import CONFIG_FILE, WEIGHTS_FILE, check_adapter


def stage(files: Path, staging: Path, base: BaseModelInfo, max_rank: int, **fields: object) -> dict:
    """Copies the adapter's files into `staging` and validates the copy, so what is checked is what is published;
    returns the version's manifest, less its number and time, with `fields` added."""
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        if (files / fname).is_file():
            shutil.copyfile(files / fname, staging / fname)
    info = check_adapter(staging, base, max_rank)
    hashes = {}
    for fname in (CONFIG_FILE, WEIGHTS_FILE):
        with open(staging / fname, "rb") as f:
            os.fsync(f.fileno())
        hashes[fname] = {"sha256": sha256_file(staging / fname), "size": (staging / fname).stat().st_size}
    return {"base_model": base.name, "base_fingerprint": base.fingerprint, "declared_base_model": info.declared_base,
            "rank": info.rank, "alpha": info.alpha, "target_modules": info.target_modules, "files": hashes,
            **fields}


def manifest_problems(where: str, manifest: dict, name: str, version: str, sizes: dict[str, int],
                      digest: Callable[[str], str]) -> list[str]:
    """What is wrong with a stored version, given its files' sizes and a way to hash one of them."""
    problems = []
    if manifest.get("name") != name or str(manifest.get("version")) != version:
        problems.append(f"{where}: manifest names {manifest.get('name')}@{manifest.get('version')}")
    for fname, meta in manifest.get("files", {}).items():
        if fname not in sizes:
            problems.append(f"{where}: {fname} is missing")
        elif sizes[fname] != meta.get("size") or digest(fname) != meta.get("sha256"):
            problems.append(f"{where}: {fname} does not match its sha256 in the manifest")
    if set(manifest.get("files", {})) != {CONFIG_FILE, WEIGHTS_FILE}:
        problems.append(f"{where}: manifest does not list {CONFIG_FILE} and {WEIGHTS_FILE}")
    return problems
