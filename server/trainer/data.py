"""Training data: reads chat, prompt/completion and Alpaca rows, curates them, splits train and eval."""

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.registry.directory import sha256_file

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


@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    counts: dict[str, int]
    files: list[dict] = field(default_factory=list)


# Tokens in one example, as the base tokenizer counts them (train.count_tokens makes one).
TokenCounter = Callable[["Example"], int]

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


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def _minhash(text: str, num_perm: int):
    from datasketch import MinHash

    words = _normalized(text).split()
    shingles = {" ".join(words[i:i + 3]) for i in range(max(1, len(words) - 2))}
    m = MinHash(num_perm=num_perm, seed=1)
    for s in shingles:
        m.update(s.encode())
    return m


def curate(examples: list[Example], count_tokens: TokenCounter, max_seq_len: int, near_threshold: float,
           log: Callable[[str], object] = print) -> tuple[list[Example], dict[str, int]]:
    """Drops empty rows, exact and near duplicates (MinHash LSH) and rows over max_seq_len tokens, in that order."""
    from datasketch import MinHashLSH

    counts = {"read": len(examples)}
    kept = [e for e in examples if e.completion.strip() and any(c.strip() for _, c in e.prompt)]
    counts["after_empty"] = len(kept)
    seen, unique = set(), []
    for e in kept:
        key = _normalized(e.text())
        if key not in seen:
            seen.add(key)
            unique.append(e)
    counts["after_exact_duplicates"] = len(unique)
    lsh, distinct = MinHashLSH(threshold=near_threshold, num_perm=128), []
    for i, e in enumerate(unique):
        m = _minhash(e.text(), 128)
        if lsh.query(m):
            continue
        lsh.insert(str(i), m)
        distinct.append(e)
    counts["after_near_duplicates"] = len(distinct)
    fitting = [e for e in distinct if count_tokens(e) <= max_seq_len]
    counts["after_length"] = len(fitting)
    for step, n in counts.items():
        log(f"data: {step:<24} {n:>7} rows")
    return fitting, counts


def in_eval(example: Example, fraction: float) -> bool:
    """A stable split: the same row lands on the same side whatever else the data holds."""
    digest = hashlib.sha256(_normalized(example.text()).encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def load(paths: list[Path], count_tokens: TokenCounter, max_seq_len: int, near_threshold: float,
         eval_fraction: float, log: Callable[[str], object] = print) -> Dataset:
    examples, files = read_rows(paths)
    kept, counts = curate(examples, count_tokens, max_seq_len, near_threshold, log)
    train = [e for e in kept if not in_eval(e, eval_fraction)]
    held = [e for e in kept if in_eval(e, eval_fraction)]
    if not train or not held:
        raise DataError(f"after curation {len(train)} rows are left to train on and {len(held)} to evaluate on; "
                        "both must be at least 1")
    counts.update(train=len(train), eval=len(held))
    log(f"data: {'train':<24} {len(train):>7} rows\ndata: {'eval':<24} {len(held):>7} rows")
    return Dataset(train, held, counts, files)
