"""Examples: chat, prompt/completion and Alpaca rows read into one shape, for training and for evaluation."""

import json
from dataclasses import dataclass
from pathlib import Path

from server.core.digest import sha256_file

_ROLES = {"system", "user", "assistant"}


class DataError(ValueError):
    """A row that cannot be used; the message starts with file:line."""


@dataclass(frozen=True)
class Example:
    prompt: tuple[tuple[str, str], ...]  # (role, content) turns before the answer
    completion: str
    where: str

    def messages(self) -> list[dict]:
        return [{"role": r, "content": c} for r, c in self.prompt]

    def conversation(self) -> list[dict]:
        """The prompt's turns and the answer: the chat as it is trained and scored."""
        return self.messages() + [{"role": "assistant", "content": self.completion}]

    def text(self) -> str:
        return "\n".join(c for _, c in self.prompt) + "\n" + self.completion


def _str(row: dict, key: str, where: str, required: bool = True) -> str:
    value = row.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise DataError(f"{where}: {key!r} must be a string")
    return value


def parse_row(row: object, where: str) -> Example:
    """One JSON row in any of the three formats; the last assistant turn of a chat is the completion."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a row must be a JSON object")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: 'messages' must be a non-empty list")
        turns = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs a role ({', '.join(sorted(_ROLES))}) and string content")
            turns.append((m["role"], m["content"]))
        if turns[-1][0] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer")
        if len(turns) < 2:
            raise DataError(f"{where}: a chat needs at least one message before the answer")
        return Example(tuple(turns[:-1]), turns[-1][1], where)
    if "prompt" in row or "completion" in row:
        return Example((("user", _str(row, "prompt", where)),), _str(row, "completion", where), where)
    if "instruction" in row or "output" in row:
        instruction, extra = _str(row, "instruction", where), _str(row, "input", where, required=False)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return Example((("user", user),), _str(row, "output", where), where)
    raise DataError(f"{where}: unknown row format; expected 'messages', 'prompt'+'completion', "
                    "or 'instruction'+'output' (Alpaca)")


def read_rows(paths: list[Path]) -> tuple[list[Example], list[dict]]:
    """All rows of all files, or DataError at the first bad one; plus each file's hash and row count."""
    examples, files = [], []
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"{path}: no such file")
        count = 0
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{where}: not valid JSON ({e.msg})") from None
                examples.append(parse_row(row, where))
                count += 1
        files.append({"path": str(path), "sha256": sha256_file(Path(path)), "rows": count})
    return examples, files
