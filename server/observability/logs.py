"""The gateway's log lines: one line per record, whatever a caller put in the values it logs.

A caller controls request paths, adapter names it asks for and what an engine repeats back; a CR or LF among them,
written raw, would forge a well-formed line of its own. Every record's message is escaped as it is formatted, so the
rule holds for every log line, present and future, not only those someone remembered to escape."""

import logging
import re

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# C0 and C1 controls, DEL, and Unicode's line and paragraph separators: whatever a log reader may take as a break.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape(text: str) -> str:
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


class OneLine(logging.Formatter):
    """Escapes control characters in the formatted message; a traceback, which is ours, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return escape(super().formatMessage(record))


def configure(level: str) -> None:
    """The root handler, at `level`, with one-line records."""
    logging.basicConfig(level=level.upper(), format=FORMAT, force=True)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(OneLine(FORMAT))
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per engine call otherwise
