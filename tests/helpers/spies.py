"""Counting the calls a piece of code makes, for tests that bound how much work a request does."""

from dataclasses import dataclass, field


@dataclass
class Calls:
    calls: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return len(self.calls)


def count_calls(monkeypatch, owner: object, *names: str) -> Calls:
    """Wraps each of `owner`'s attributes `names` (where it has one) so that every call is recorded by name."""
    seen = Calls()
    for name in names:
        original = getattr(owner, name, None)
        if original is None:
            continue
        monkeypatch.setattr(owner, name, lambda *a, _n=name, _f=original, **k: (seen.calls.append(_n), _f(*a, **k))[1])
    return seen
