"""Engine-side evaluation against a scripted engine: which tokens are scored, how windows and answers are counted,
and the gate."""

import asyncio
import math

import pytest

from server.core.examples import Example
from server.rollout.evaluation import EvalOptions, EvalSet, Scorer, compare, table, verdict

GEN_PROMPT = 1  # the token the scripted chat template appends for add_generation_prompt


def _logprob(model: str, token: int) -> float:
    """The scripted model's log-probability of a token: the candidate finds every token likelier."""
    return -0.1 * (token % 7 + 1) * (0.5 if model == "acme@2" else 1.0)


class ScriptedEngine:
    """/tokenize: one token per character (its code point), a chat turn ends with 0; /v1/completions: prompt
    logprobs from _logprob, and the greedy answer "yes" for every prompt."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []

    async def __call__(self, path: str, body: dict) -> dict:
        self.calls.append((path, body))
        await asyncio.sleep(0)
        if path == "/tokenize":
            if "prompt" in body:
                return {"tokens": [ord(c) for c in body["prompt"]]}
            ids = [t for m in body["messages"] for t in [*map(ord, m["content"]), 0]]
            return {"tokens": ids + ([GEN_PROMPT] if body["add_generation_prompt"] else [])}
        ids = body["prompt"]
        usage = {"prompt_tokens": len(ids), "completion_tokens": body["max_tokens"]}
        if body.get("prompt_logprobs") is not None:
            entries = [None] + [{str(t): {"logprob": _logprob(body["model"], t), "rank": 1}} for t in ids[1:]]
            return {"choices": [{"text": "x", "prompt_logprobs": entries}], "usage": usage}
        return {"choices": [{"text": " yes\n"}], "usage": usage}


def _example(question: str, answer: str) -> Example:
    return Example((("user", question),), answer, "t")


def test_held_out_loss_scores_only_answer_tokens_and_text_windows_skip_their_first_token():
    examples = [_example("ab", "yes"), _example("cd", "no")]
    engine = ScriptedEngine()
    options = EvalOptions(max_seq_len=16, generations=1, max_new_tokens=4, max_forgetting=0.5)
    result = asyncio.run(compare(Scorer(engine), "acme@2", "base", EvalSet(examples, "hello world!", options)))

    # Prompt "ab" + end of turn + generation prompt is 4 tokens; the conversation is "ab",0,"yes",0: its answer
    # tokens are positions 4.. ("es", 0), since the scripted template puts no generation token in the conversation.
    answer_tokens = []
    for ex in examples:
        prompt = [*map(ord, ex.prompt[0][1]), 0, GEN_PROMPT]
        full = [*map(ord, ex.prompt[0][1]), 0, *map(ord, ex.completion), 0]
        answer_tokens += full[len(prompt):]
    expected = sum(0.1 * (t % 7 + 1) for t in answer_tokens) / len(answer_tokens)
    assert result["reference"]["eval_loss"] == pytest.approx(expected)
    assert result["candidate"]["eval_loss"] == pytest.approx(expected / 2)
    # "hello world!" is 12 tokens in one window of 16: 11 are predicted.
    text = [ord(c) for c in "hello world!"]
    assert result["reference"]["general_perplexity"] == pytest.approx(
        math.exp(sum(0.1 * (t % 7 + 1) for t in text[1:]) / 11))
    assert result["forgetting"] < 0 and result["passed"], result["verdict"]
    # One generation asked for: the first example, answered "yes" (stripped), an exact match.
    assert result["candidate"]["exact_match"] == 1.0 and len(result["candidate"]["samples"]) == 1
    generations = [b for p, b in engine.calls if p == "/v1/completions" and "prompt_logprobs" not in b]
    assert len(generations) == 2 and all(b["temperature"] == 0 and b["max_tokens"] == 4 for b in generations)


def test_long_text_is_scored_in_windows_of_max_seq_len():
    engine = ScriptedEngine()
    options = EvalOptions(max_seq_len=16, generations=0)
    text = "x" * 40  # windows of 16, 16 and 8 tokens
    asyncio.run(compare(Scorer(engine), "acme@2", "base", EvalSet([_example("a", "b")], text, options)))
    scored = [len(b["prompt"]) for p, b in engine.calls
              if p == "/v1/completions" and b["model"] == "base" and b["prompt"][0] == ord("x")]
    assert sorted(scored) == [8, 16, 16]


def test_the_gate_refuses_a_worse_loss_and_too_much_forgetting():
    better = {"reference": {"eval_loss": 2.0}, "candidate": {"eval_loss": 1.5}, "forgetting": 0.01}
    assert verdict(better, 0.05)[0]
    assert not verdict({**better, "candidate": {"eval_loss": 2.0}}, 0.05)[0]
    ok, why = verdict({**better, "forgetting": 0.2}, 0.05)
    assert not ok and why.startswith("general perplexity rose 20.0%")


def test_the_table_names_both_models_and_the_decision():
    metrics = {"reference_model": "base", "candidate_model": "acme@2", "passed": False, "verdict": "why",
               "reference": {"eval_loss": 2.0, "eval_perplexity": 7.39},
               "candidate": {"eval_loss": 2.5, "eval_perplexity": 12.18}}
    lines = table(metrics).splitlines()
    assert "base" in lines[0] and "acme@2" in lines[0]
    assert lines[1].split()[-2:] == ["2.000", "2.500"] and lines[-1] == "failed: why"


async def test_the_admin_api_refuses_bad_eval_requests_before_storing_anything(tmp_path, base, adapter_factory):
    """Over the real app and a stand-in engine (which could not score anyway): every refusal names its field, and a
    refused upload leaves no version behind."""
    from loadtest.stub_engine import StubEngine
    from tests.helpers.archives import archive
    from tests.helpers.in_process import gateway_over, ready
    from tests.helpers.polling import wait_for

    admin = {"Authorization": "Bearer admin-token"}
    engine = await StubEngine().start()
    try:
        async with gateway_over([engine.url], str(base.path), tmp_path) as client:
            assert await wait_for(lambda: ready(client), 30)
            form = {"name": "bot", "tenant": "acme"}

            async def upload(**extra) -> dict:
                files = {"file": ("bot.tar.gz", archive(adapter_factory(seed=1))), **extra.pop("files", {})}
                r = await client.post("/admin/adapters", headers=admin, data={**form, **extra}, files=files)
                return {"status": r.status_code, **r.json().get("error", {})}

            no_data = await upload(promote="auto")
            bad_json = await upload(files={"eval_data": ("e.jsonl", b'{"prompt": "Q", "completion": "A"}\n{oops\n')})
            empty = await upload(files={"eval_data": ("e.jsonl", b"\n\n")})
            too_many = await upload(files={"eval_data": ("e.jsonl", b'{"prompt": "Q", "completion": "A"}\n' * 10_001)})
            listed = (await client.get("/admin/adapters", headers=admin)).json()["data"]
            assert (await upload())["status"] == 201
            bad_row = await client.post("/admin/adapters/bot/versions/1/eval", headers=admin,
                                        json={"rows": [{"prompt": "Q", "completion": "A"}, {"messages": []}]})
            unknown = await client.post("/admin/adapters/bot/versions/1/eval", headers=admin,
                                        json={"rows": [{"prompt": "Q", "completion": "A"}], "max_seq_len": 4})
            superscript = await client.post("/admin/adapters/bot/versions/1/eval", headers=admin,
                                            json={"rows": [{"prompt": "Q", "completion": "A"}], "against": "²"})
    finally:
        await engine.stop()
    assert (no_data["status"], no_data["param"]) == (400, "promote")
    assert (bad_json["status"], bad_json["param"]) == (400, "eval_data")
    assert bad_json["message"].startswith("eval_data:2: not valid JSON")
    assert empty["message"] == "eval_data: no rows" and listed == []
    assert (too_many["status"], too_many["param"]) == (400, "eval_data")  # as the JSON route refuses 10,001 rows
    assert bad_row.status_code == 400 and bad_row.json()["error"]["param"] == "rows"
    assert bad_row.json()["error"]["message"] == "rows[1]: 'messages' must be a non-empty list"
    assert unknown.status_code == 400 and "max_seq_len" in str(unknown.json()["error"])
    # "²" is a digit to str.isdigit() but no number to int(): it names no version, and answers as an unknown alias.
    assert superscript.status_code == 404 and superscript.json()["error"]["param"] == "against"


class Held(ScriptedEngine):
    """The scripted engine, counting the calls it runs at once, and holding completions until `go` is set."""

    def __init__(self):
        super().__init__()
        self.running = self.most = 0
        self.go = asyncio.Event()
        self.waiting: list[dict] = []  # completions held so far

    async def __call__(self, path: str, body: dict) -> dict:
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            if path == "/v1/completions" and not self.go.is_set():
                self.waiting.append(body)
                await self.go.wait()
            return await super().__call__(path, body)
        finally:
            self.running -= 1


def _gateway(tmp_path, engine: Held, budget: int):
    """What Evaluator.evaluate uses: one engine, admission, a ledger with acme's budget."""
    from types import SimpleNamespace

    from server.tenancy.admission import Admission
    from server.core.config import Budget
    from server.engine.routing import Backend, Router
    from server.tenancy.usage import usage_ledger

    call = lambda path, body, adapter: engine(path, body)  # noqa: E731
    backend = Backend(SimpleNamespace(url="http://engine", call=call), up=True)
    registry = SimpleNamespace(get=lambda name, version: SimpleNamespace(key=f"{name}@{version}"))
    return SimpleNamespace(registry=registry, router=Router([backend]), admission=Admission(64, 64, 1),
                           settings=SimpleNamespace(model_name="base", eval_concurrency=3),
                           usage=usage_ledger(str(tmp_path / "registry"), tmp_path, {"acme": Budget(
                               tokens_per_day=budget)}))


EVALSET = EvalSet([_example(f"question {i}", "yes") for i in range(12)], "some general text " * 20,
                  EvalOptions(generations=4, max_new_tokens=8))


async def test_an_evaluation_is_admitted_charged_and_bounded_like_the_tenants_requests(tmp_path):
    """Issue 25, item 4 (on 9ae7b22 evaluation sent 16 calls at once, outside admission and budgets)."""
    from server.gateway.evaluations import Evaluator
    from server.core.errors import APIError

    engine = Held()
    engine.go.set()
    gw = _gateway(tmp_path, engine, budget=EVALSET.token_bound() + 1)
    result = await Evaluator.evaluate(gw, "acme", 2, EVALSET, "base", "acme")
    assert result["examples"] == 12 and engine.most == 3  # its own share of the engine, not 16
    assert gw.router.backends[0].in_flight == 0 and gw.admission.tenants == {}
    used = sum(len(b["prompt"]) + b["max_tokens"] for path, b in engine.calls if path == "/v1/completions")
    totals = await gw.usage.totals("acme", 0, 2e9)
    assert totals["prompt_tokens"] + totals["completion_tokens"] == used <= EVALSET.token_bound()
    with pytest.raises(APIError) as refused:  # its bound no longer fits in what the first one left
        await Evaluator.evaluate(gw, "acme", 2, EVALSET, "base", "acme")
    assert refused.value.status == 429
    gw.admission.per_tenant = 2
    gw.usage.budgets.clear()
    with pytest.raises(APIError) as busy:  # three slots at once are more than the tenant may hold
        await Evaluator.evaluate(gw, "acme", 2, EVALSET, "base", "acme")
    assert busy.value.status == 429 and busy.value.code == "too_many_requests"


async def test_an_evaluation_left_by_its_caller_stops_and_is_charged_what_it_started(tmp_path):
    from server.gateway.evaluations import Evaluator

    engine = Held()
    gw = _gateway(tmp_path, engine, budget=10 ** 9)
    task = asyncio.create_task(Evaluator.evaluate(gw, "acme", 2, EVALSET, "base", "acme"))
    while len(engine.waiting) < 3:  # all 3 of its slots held by completions
        await asyncio.sleep(0)
    held = list(engine.waiting)
    task.cancel()  # what the caller leaving does to the handler (ClientWatch)
    with pytest.raises(asyncio.CancelledError):
        await task
    calls = len(engine.calls)
    engine.go.set()
    await asyncio.sleep(0.05)
    assert len(engine.calls) == calls and engine.running == 0  # nothing more sent, nothing left running
    totals = await gw.usage.totals("acme", 0, 2e9)
    assert totals["prompt_tokens"] == sum(len(b["prompt"]) + b["max_tokens"] for b in held)
    assert gw.usage._held["acme"] == 0


def test_every_dimension_of_an_evaluation_is_bounded():
    from pydantic import ValidationError

    for field, value in (("generations", 1001), ("max_new_tokens", 1025), ("max_seq_len", 8193)):
        with pytest.raises(ValidationError, match=field):
            EvalOptions(**{field: value})


async def test_an_evaluation_that_fails_leaves_no_engine_call_running(tmp_path):
    """One call failing (a row longer than the context, say) cancels the others before the error is answered."""
    from server.gateway.evaluations import Evaluator

    class Failing(Held):
        """Holds the first two completions and fails the third."""

        async def __call__(self, path: str, body: dict) -> dict:
            if path == "/v1/completions" and len(self.waiting) == 2:
                raise RuntimeError("prompt too long")
            return await super().__call__(path, body)

    engine = Failing()
    gw = _gateway(tmp_path, engine, budget=10 ** 9)
    with pytest.raises(RuntimeError):
        await Evaluator.evaluate(gw, "acme", 2, EVALSET, "base", "acme")
    assert engine.running == 0 and gw.router.backends[0].in_flight == 0
    calls = len(engine.calls)
    engine.go.set()
    await asyncio.sleep(0.05)
    assert len(engine.calls) == calls and gw.usage._held["acme"] == 0
