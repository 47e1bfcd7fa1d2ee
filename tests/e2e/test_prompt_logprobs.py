"""Prompt logprobs with adapters, batched: vLLM's CPU worker raised on them and took the engine down (any caller could
send them); with server/vllm_plugins/prompt_logprobs.py each request's tokens are scored with its own adapter."""

import asyncio
import math

import httpx

PROMPT = "Ada and the river of notes"


def _reference_logprobs(reference, adapter_dir, ids: list[int]) -> list[float]:
    torch = reference.torch
    with torch.no_grad():
        logits = reference._model(adapter_dir)(input_ids=torch.tensor([ids])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return [logprobs[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_prompt_logprobs_of_several_adapters_at_once_are_each_their_own(server, reference):
    ids = reference.tokenizer(PROMPT)["input_ids"]
    models = [None, "alpha", "beta"] * 4

    async def one(client: httpx.AsyncClient, adapter: str | None) -> httpx.Response:
        body = {"model": "demo-base", "prompt": ids, "max_tokens": 2, "prompt_logprobs": 0,
                **({"adapter": f"{adapter}@1"} if adapter else {})}
        return await client.post("/v1/completions", json=body)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as client:
            return await asyncio.gather(*(one(client, m) for m in models))

    answers = asyncio.run(burst())
    assert [r.status_code for r in answers] == [200] * len(models), [r.text[:300] for r in answers]
    for adapter, r in zip(models[:3], answers[:3]):
        entries = r.json()["choices"][0]["prompt_logprobs"]
        got = [entries[i][str(ids[i])]["logprob"] for i in range(1, len(ids))]
        want = _reference_logprobs(reference, server.adapter_dirs[adapter] if adapter else None, ids)
        assert max(abs(a - b) for a, b in zip(got, want)) < 1e-3, adapter
    # the adapters do change the scores, so each request was scored with its own
    scores = [sum(e[str(ids[i])]["logprob"] for i, e in enumerate(r.json()["choices"][0]["prompt_logprobs"]) if e)
              for r in answers[:3]]
    assert len({round(s, 3) for s in scores}) == 3 and all(math.isfinite(s) for s in scores)
