"""Recipes: registered versions with weights, composed into a new registered version whose manifest records them."""

import hashlib
import json
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from server.core.base_model import BaseModelInfo
from server.core.protocol import MAX_ADAPTER_WEIGHT, MAX_COMPOSED_SOURCES
from server.registry import Registry, Version
from server.registry.refs import COMPOSED_PREFIX
from server.registry.validation import WEIGHTS_FILE
from server.weights.compose import ComposeError, Source, write



@dataclass(frozen=True)
class Part:
    version: Version
    weight: float

    @property
    def record(self) -> dict:
        return {"name": self.version.name, "version": self.version.version, "weight": self.weight,
                "sha256": self.version.manifest["files"][WEIGHTS_FILE]["sha256"]}


def check_weight(weight: float, label: str) -> float:
    """A weight rounded to two decimals; zero, non-finite or beyond ±MAX_ADAPTER_WEIGHT is refused."""
    rounded = round(float(weight), 2)
    if not -MAX_ADAPTER_WEIGHT <= rounded <= MAX_ADAPTER_WEIGHT or rounded == 0:
        raise ComposeError(f"{label}: weight {weight} must be non-zero (after rounding to two decimals) and "
                           f"within ±{MAX_ADAPTER_WEIGHT:g}")
    return rounded


def check_parts(parts: Sequence[Part], base: BaseModelInfo, max_rank: int) -> None:
    """Refuses an empty or too long recipe, a version named twice, sources made for another base model, and ranks
    summing past `max_rank` (from the manifests, before any weights are read)."""
    if not 1 <= len(parts) <= MAX_COMPOSED_SOURCES:
        raise ComposeError(f"a recipe names 1 to {MAX_COMPOSED_SOURCES} adapters, not {len(parts)}")
    keys = [p.version.key for p in parts]
    if len(set(keys)) != len(keys):
        raise ComposeError(f"a recipe names {max(keys, key=keys.count)} twice")
    for part in parts:
        if part.version.manifest.get("base_fingerprint") != base.fingerprint:
            raise ComposeError(f"{part.version.key} was made for base model "
                               f"{part.version.manifest.get('base_model')!r}, not the served {base.name!r}")
    rank = sum(p.version.manifest.get("rank", 0) for p in parts)
    if rank > max_rank:
        ranks = " + ".join(f"{p.version.key} (rank {p.version.manifest.get('rank')})" for p in parts)
        raise ComposeError(f"the composed rank {rank} = {ranks} exceeds MAX_LORA_RANK {max_rank}")


def composed_name(tenant: str, parts: Sequence[Part]) -> str:
    """The content address of a recipe: the same sources and weights, in any order, name the same version."""
    records = sorted((p.record for p in parts), key=lambda r: (r["name"], r["version"]))
    digest = hashlib.sha256(json.dumps([tenant, records], sort_keys=True).encode()).hexdigest()
    return f"{COMPOSED_PREFIX}{digest[:32]}"


def register_composed(registry: Registry, name: str, parts: Sequence[Part], *, base: BaseModelInfo, max_rank: int,
                      tenant: str, origin: str, public: bool = False) -> Version:
    """Fetches the sources, concatenates them and registers the result as the next version of `name`."""
    check_parts(parts, base, max_rank)
    work = Path(tempfile.mkdtemp(prefix="loraplex-compose-"))
    try:
        sources = []
        for i, part in enumerate(parts):
            folder = work / str(i)
            folder.mkdir()
            registry.fetch(part.version, folder)
            sources.append(Source(folder, part.weight, part.version.key))
        (work / "out").mkdir()
        write(sources, work / "out", max_rank)
        return registry.register(name, work / "out", base=base, max_rank=max_rank, tenant=tenant, origin=origin,
                                 public=public, extra={"recipe": [p.record for p in parts]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
