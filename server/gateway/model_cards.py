"""/v1/models: the base model and the adapters a caller may use, with only the versions and aliases it may use."""

from server.core.protocol import ModelCard, ModelList
from server.registry import NotFound, Registry


def visible(manifest: dict, tenant: str | None) -> bool:
    return tenant is None or manifest.get("tenant") == tenant or bool(manifest.get("public"))


def model_list(registry: Registry, base: str, started: float, tenant: str | None) -> ModelList:
    """Read from the registry itself (a thread's work): a listing shows what is stored now."""
    cards = [ModelCard(id=base, created=int(started), owned_by="loraplex", root=base)]
    for name in registry.names():
        try:
            manifests = {v: registry.get(name, v).manifest for v in registry.versions(name)}
            aliases, canaries = registry.alias_table(name)
        except NotFound:
            continue  # deleted while listing
        usable = {v: m for v, m in manifests.items() if visible(m, tenant)}
        if not usable:
            continue
        newest = usable[max(usable)]
        # A public adapter is listed to every tenant, but its owner only to the owner itself.
        owner = newest["tenant"] if tenant in (None, newest["tenant"]) else "loraplex"
        cards.append(ModelCard(
            id=name, created=int(newest["created"]), owned_by=owner, root=name, parent=base,
            versions=sorted(usable), aliases={a: v for a, v in aliases.items() if v in usable},
            canaries={a: c for a, c in canaries.items() if c["version"] in usable and aliases.get(a) in usable} or None,
        ))
    return ModelList(data=cards)
