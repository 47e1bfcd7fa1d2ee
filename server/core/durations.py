"""Durations and times as people type them: 45s, 30m, 12h, 7d, or an ISO 8601 time."""

import datetime
import re
import time

# ASCII digits only: \d and str.isdigit() also take "²" and "١", which float() refuses or reads.
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]+)?")
_AGE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)([smhd])$")


def duration(text: str) -> float | None:
    """Seconds in a duration such as 45s, 30m, 12h or 7d (a bare number is seconds); None if it is none."""
    text = text.strip()
    if _NUMBER.fullmatch(text):
        return float(text)
    age = _AGE.match(text)
    return float(age[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[age[2]] if age else None


def parse_since(text: str, now: float | None = None) -> float:
    """A start time from an ISO 8601 time (UTC unless it names a zone) or an age such as 30m, 12h or 7d."""
    if _AGE.match(text.strip()):
        return (time.time() if now is None else now) - duration(text)
    try:
        when = datetime.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO 8601 time nor an age such as 30m, 12h or 7d") from None
    return (when if when.tzinfo else when.replace(tzinfo=datetime.timezone.utc)).timestamp()


def positive_duration(text: str) -> str:
    """`text` if it is a positive duration (12h, 30d); else ValueError, for a validator to report."""
    seconds = duration(text)
    if seconds is None or seconds <= 0:
        raise ValueError("a positive duration such as 12h or 30d")
    return text
