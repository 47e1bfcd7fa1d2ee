"""`loraplex registry copy`: one registry into another, directory or object store either way, numbers kept."""

import tempfile
from collections.abc import Callable
from pathlib import Path

from server.registry import Conflict, Registry


def copy_registry(source: Registry, dest: Registry,
                  log: Callable[[str], None] = print) -> tuple[int, int]:
    """Copies every version (same number, same manifest) and then each adapter's owner and aliases.

    Versions already in `dest` are left as they are, so an interrupted copy can simply be run again; returns
    (versions copied, versions skipped)."""
    copied = skipped = 0
    there = dest.refresh()
    for name, versions in source.refresh().items():
        present = set(there.get(name, []))
        for number in versions:
            if number in present:
                skipped += 1
                continue
            version = source.get(name, number)
            with tempfile.TemporaryDirectory(prefix="loraplex-copy-") as files:
                source.fetch(version, Path(files))
                try:
                    dest.adopt(version, Path(files))
                except Conflict:
                    skipped += 1
                    continue
            copied += 1
            log(f"copied {version.key}")
        state = source.state(name)
        dest.set_state(name, {k: state[k] for k in ("tenant", "aliases", "alias_history", "public") if k in state})
    return copied, skipped
