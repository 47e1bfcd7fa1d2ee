"""Training data: reads chat, prompt/completion and Alpaca rows, curates them, splits train and eval."""

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from server.core.examples import DataError, Example, read_rows

@dataclass
class Dataset:
    train: list[Example]
    eval: list[Example]
    counts: dict[str, int]
    files: list[dict] = field(default_factory=list)


# Tokens in one example, as the base tokenizer counts them (model.count_tokens makes one).
TokenCounter = Callable[["Example"], int]

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
