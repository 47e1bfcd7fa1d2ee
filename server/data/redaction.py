"""Redaction before storage: documented patterns replaced in every string of a request and its answer."""

import re
from collections.abc import Iterable

_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def _phone(match: re.Match) -> str:
    """A phone number has 7 to 15 digits (E.164) and is not an ISO date."""
    digits = sum(c.isdigit() for c in match[0])
    return "[phone]" if 7 <= digits <= 15 and not _ISO_DATE.fullmatch(match[0]) else match[0]


# name: (pattern, replacement). Phone numbers: an optional +country code, then groups of digits separated by
# spaces, dots, dashes or parentheses.
PATTERNS: dict[str, tuple[re.Pattern, object]] = {
    "email": (re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"), "[email]"),
    "phone": (re.compile(r"(?<![\w+])(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,4}(?!\w)"),
              _phone),
}


def redact(value: object, names: Iterable[str]) -> object:
    """A copy of a JSON-like value with every string's matches of the named patterns replaced."""
    patterns = [PATTERNS[n] for n in names]
    if not patterns:
        return value
    return _walk(value, patterns)


def _walk(value: object, patterns: list[tuple[re.Pattern, object]]) -> object:
    if isinstance(value, str):
        for pattern, replacement in patterns:
            value = pattern.sub(replacement, value)
        return value
    if isinstance(value, dict):
        return {k: _walk(v, patterns) for k, v in value.items()}
    if isinstance(value, list):
        return [_walk(v, patterns) for v in value]
    return value
