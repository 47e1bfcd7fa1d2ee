"""Scores an adapter version through a serving engine, batched by vLLM: held-out loss per answer token from prompt
logprobs, greedy answers (exact match, ROUGE-L) and general-text perplexity, beside a reference model (the base or
another version) so that forgetting shows. The gateway (`/admin/.../eval`, uploads) and the trainer both use it."""

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from server.core.examples import Example

# POSTs a JSON body to an engine path and returns its JSON answer.
Call = Callable[[str, dict], Awaitable[dict]]


# An evaluation is work a tenant-admin asks of the engines: every dimension of it is bounded.
MAX_ROWS = 10_000
MAX_GENERAL_TEXT = 4_000_000  # characters


class EvalOptions(BaseModel):
    """How a version is scored, and the gate it must pass."""

    model_config = ConfigDict(extra="forbid")
    max_seq_len: int = Field(512, ge=16, le=8192, description="Tokens of an example or general-text window scored")
    generations: int = Field(32, ge=0, le=1000, description="Held-out rows scored by greedy generation")
    max_new_tokens: int = Field(64, ge=1, le=1024)
    max_forgetting: float = Field(0.05, ge=0, description="Allowed relative rise of general-text perplexity")


@dataclass(frozen=True)
class EvalSet:
    examples: list[Example]
    general_text: str | None
    options: EvalOptions

    def token_bound(self) -> int:
        """The most tokens scoring two models on it can cost: each row (its text's bytes bound its tokens) and
        the general text read by both models, and the generations' answers."""
        limit, generations = self.options.max_seq_len, self.options.generations
        rows = [len(json.dumps(ex.conversation()).encode()) for ex in self.examples]
        text = len(self.general_text.encode()) if self.general_text else 0
        answers = sum(rows[:generations]) + len(rows[:generations]) * self.options.max_new_tokens  # prompts whole
        return 2 * (sum(min(n, limit) for n in rows) + len(rows) + text + answers)


@dataclass(frozen=True)
class _Tokens:
    """An eval set as the engine tokenizes it: each example's prompt and whole conversation, the text's windows."""

    prompts: list[list[int]]
    fulls: list[list[int]]
    windows: list[list[int]]


class Scorer:
    """The engine calls evaluation makes, at most `concurrency` at once so that vLLM batches them, and the tokens they
    cost: what the engine counted, plus the bound of each call cut short (vLLM counts nothing it aborts)."""

    def __init__(self, call: Call, concurrency: int = 16):
        self.call = call
        self.slots = asyncio.Semaphore(concurrency)
        self.prompt_tokens = self.completion_tokens = 0

    async def post(self, path: str, body: dict) -> dict:
        async with self.slots:
            try:
                answer = await self.call(path, body)
            except asyncio.CancelledError:
                if path == "/v1/completions":  # its prompt is token ids
                    self.prompt_tokens += len(body["prompt"]) + body["max_tokens"]
                raise
        usage = answer.get("usage") or {}
        self.prompt_tokens += usage.get("prompt_tokens") or 0
        self.completion_tokens += usage.get("completion_tokens") or 0
        return answer

    async def chat_tokens(self, messages: list[dict], generation_prompt: bool) -> list[int]:
        """The chat template applied and tokenized by the engine, as the trainer's tokenizer does it."""
        answer = await self.post("/tokenize", {"messages": messages, "add_generation_prompt": generation_prompt})
        return answer["tokens"]

    async def text_tokens(self, text: str) -> list[int]:
        return (await self.post("/tokenize", {"prompt": text}))["tokens"]

    async def nll(self, model: str, ids: list[int], first: int) -> tuple[float, int]:
        """Negative log-likelihood of ids[first:], each token given those before it, and how many tokens that is."""
        answer = await self.post("/v1/completions", {"model": model, "prompt": ids, "max_tokens": 1,
                                                     "temperature": 0, "prompt_logprobs": 0})
        entries = answer["choices"][0]["prompt_logprobs"]
        start = max(first, 1)
        return -sum(entries[i][str(ids[i])]["logprob"] for i in range(start, len(ids))), len(ids) - start

    async def greedy(self, model: str, ids: list[int], max_new_tokens: int) -> str:
        answer = await self.post("/v1/completions", {"model": model, "prompt": ids, "max_tokens": max_new_tokens,
                                                     "temperature": 0})
        return answer["choices"][0]["text"].strip()


async def _tokenize(scorer: Scorer, evalset: EvalSet) -> _Tokens:
    examples, limit = evalset.examples, evalset.options.max_seq_len
    prompts = _together(*(scorer.chat_tokens(ex.messages(), True) for ex in examples))
    fulls = _together(*(scorer.chat_tokens(ex.conversation(), False) for ex in examples))
    text = scorer.text_tokens(evalset.general_text) if evalset.general_text else _nothing()
    prompt_ids, full_ids, text_ids = await _together(prompts, fulls, text)
    windows = [text_ids[i:i + limit] for i in range(0, len(text_ids), limit)]
    return _Tokens(prompt_ids, [ids[:limit] for ids in full_ids], [w for w in windows if len(w) >= 2])


async def _together(*work: Awaitable) -> list:
    """The results of all; when one fails, the others are cancelled (and awaited) before the error goes on, so no
    engine call outlives the evaluation that made it."""
    tasks = [asyncio.ensure_future(w) for w in work]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def _nothing() -> list[int]:
    return []


def mean_nll(parts: list[tuple[float, int]]) -> float:
    """Mean negative log-likelihood per token over (sum, count) parts."""
    return sum(s for s, _ in parts) / max(sum(n for _, n in parts), 1)


def generation_scores(examples: list[Example], answers: list[str]) -> dict:
    """Answers scored against the references: exact match and ROUGE-L F1, with the samples."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])
    pairs = list(zip(examples, answers))
    n = max(len(pairs), 1)
    return {"exact_match": sum(a == ex.completion.strip() for ex, a in pairs) / n,
            "rouge_l": sum(scorer.score(ex.completion, a)["rougeL"].fmeasure for ex, a in pairs) / n,
            "samples": [{"question": ex.prompt[-1][1], "reference": ex.completion, "answer": a} for ex, a in pairs]}


async def measure(scorer: Scorer, model: str, evalset: EvalSet, tokens: _Tokens) -> dict:
    """One model's metrics on the eval set."""
    options = evalset.options
    answered = [(p, f) for p, f in zip(tokens.prompts, tokens.fulls) if len(f) > max(len(p), 1)]
    losses = _together(*(scorer.nll(model, full, len(prompt)) for prompt, full in answered))
    texts = _together(*(scorer.nll(model, window, 1) for window in tokens.windows))
    answers = _together(*(scorer.greedy(model, p, options.max_new_tokens)
                               for p in tokens.prompts[:options.generations]))
    example_nll, text_nll, replies = await _together(losses, texts, answers)
    loss = mean_nll(example_nll)
    result = {"eval_loss": loss, "eval_perplexity": math.exp(loss),
              **generation_scores(evalset.examples[:options.generations], replies)}
    if tokens.windows:
        result["general_perplexity"] = math.exp(mean_nll(text_nll))
    return result


async def compare(scorer: Scorer, candidate: str, reference: str, evalset: EvalSet) -> dict:
    """The candidate's metrics and the reference's, measured on one tokenization, and the rise in general perplexity."""
    tokens = await _tokenize(scorer, evalset)
    ref, cand = await _together(measure(scorer, reference, evalset, tokens),
                                     measure(scorer, candidate, evalset, tokens))
    result = {"candidate_model": candidate, "reference_model": reference, "examples": len(evalset.examples),
              "reference": ref, "candidate": cand}
    if "general_perplexity" in cand:
        result["forgetting"] = cand["general_perplexity"] / ref["general_perplexity"] - 1
    passed, why = verdict(result, evalset.options.max_forgetting)
    return {**result, "passed": passed, "verdict": why}


def verdict(metrics: dict, max_forgetting: float) -> tuple[bool, str]:
    """The gate: the candidate must beat the reference's held-out loss without raising general perplexity past
    `max_forgetting`."""
    ref, cand = metrics["reference"], metrics["candidate"]
    if cand["eval_loss"] >= ref["eval_loss"]:
        return False, f"held-out loss {cand['eval_loss']:.3f} does not beat the reference's {ref['eval_loss']:.3f}"
    if "forgetting" in metrics and metrics["forgetting"] > max_forgetting:
        return False, f"general perplexity rose {metrics['forgetting']:.1%}, above the allowed {max_forgetting:.1%}"
    return True, (f"held-out loss {cand['eval_loss']:.3f} < reference {ref['eval_loss']:.3f}"
                  + (f", forgetting {metrics['forgetting']:+.1%}" if "forgetting" in metrics else ""))


ROWS = [("held-out loss", "eval_loss"), ("held-out perplexity", "eval_perplexity"),
        ("exact match", "exact_match"), ("ROUGE-L", "rouge_l"), ("general perplexity", "general_perplexity")]


def table(metrics: dict) -> str:
    """The comparison as the trainer and `loraplex eval` print it."""
    ref_name, cand_name = metrics.get("reference_model", "reference"), metrics.get("candidate_model", "candidate")
    width = max(12, len(ref_name) + 2, len(cand_name) + 2)
    lines = [f"{'metric':<22}{ref_name:>{width}}{cand_name:>{width}}"]
    for label, key in ROWS:
        if key in metrics["reference"]:
            lines.append(f"{label:<22}{metrics['reference'][key]:>{width}.3f}{metrics['candidate'][key]:>{width}.3f}")
    if "forgetting" in metrics:
        lines.append(f"{'forgetting':<22}{'':>{width}}{metrics['forgetting']:>+{width}.1%}")
    if "verdict" in metrics:
        lines.append(f"{'passed' if metrics['passed'] else 'failed'}: {metrics['verdict']}")
    return "\n".join(lines)
