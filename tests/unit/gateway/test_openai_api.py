"""The /v1 forwarding path piece by piece: the relays over chunked input, and _send over engines on real sockets."""

import asyncio
import json
from types import SimpleNamespace

import aiohttp
import pytest
from aiohttp import web
from fastapi.responses import Response
from hypothesis import given, settings
from hypothesis import strategies as st

from server.core.errors import APIError
from server.core.protocol import CompletionRequest
from server.engine.client import EngineClient
from server.engine.process import free_port
from server.engine.routing import Backend, Router
from server.gateway.context import RequestContext
from server.gateway.relay import Usage
from server.gateway.relay import relay_body as _relay_body
from server.gateway.relay import relay_events as _relay
from server.gateway.relay import whole_usage as _usage
from server.gateway.serving import Serving
from server.observability.metrics import Metrics, RequestTimer
from server.tenancy.admission import Admission

USAGE = {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}
EVENTS = [b'data: {"choices":[{"text":"a"}]}', b'data: {"choices":[{"text":"b"}]}',
          b'data: {"choices":[],"usage":' + json.dumps(USAGE, separators=(",", ":")).encode() + b"}",
          b"data: [DONE]"]
STREAM = b"".join(e + b"\n\n" for e in EVENTS)


async def chunked(data: bytes, cuts: list[int]):
    start = 0
    for cut in sorted(set(cuts)) + [len(data)]:
        if cut > start:
            yield data[start:cut]
            start = cut


def timer() -> RequestTimer:
    return RequestTimer(Metrics(10), "completions", "(base)")


async def collect(gen) -> bytes:
    return b"".join([part async for part in gen])


class Tapped:
    """What the relay shows an answer being stored: the pieces it saw, and whether it ended normally."""

    def __init__(self, stored: bool = True):
        self.stored, self.seen, self.end = stored, [], None

    def chunk(self, data: bytes) -> None:
        self.seen.append(data)

    def ended(self, streamed: bool) -> None:
        self.end = streamed

    def whole(self, content: bytes) -> None:
        self.seen.append(content)
        self.end = False

    def finish(self) -> None:
        self.finished = True


@settings(max_examples=50, deadline=None)
@given(cuts=st.lists(st.integers(1, len(STREAM) - 1), max_size=12), keep=st.booleans())
async def test_relay_passes_events_through_whatever_the_chunking(cuts, keep):
    t, tap = timer(), Tapped(stored=keep)
    out = await collect(_relay(chunked(STREAM, cuts), t, Usage(final=keep, running=False), limit=1 << 20,
                               answer=tap))
    expected = STREAM if keep else STREAM.replace(EVENTS[2] + b"\n\n", b"")
    assert out == expected
    assert t.tokens == (3, 2) and not t.first
    assert tap.end is True and b"".join(tap.seen) == (STREAM if keep else b""), "whole events, when stored"


def running(text: str, index: int, prompt: int, completion: int) -> bytes:
    usage = {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}
    event = {"id": "x", "choices": [{"index": index, "text": text, "logprobs": {"top_logprobs": [{"usage": -1.0}]}}],
             "usage": usage}
    return b"data: " + json.dumps(event, separators=(",", ":")).encode()


# Two choices of one 7-token prompt; vLLM counts each choice's tokens in its own events.
RUNNING = [running("a", 0, 7, 1), running("b", 1, 7, 1), running("c", 0, 7, 2)]


@pytest.mark.parametrize("wants", [Usage(False, False), Usage(True, True)])
async def test_a_stream_left_early_is_charged_the_engines_running_count(wants):
    t = timer()
    t.choices_per_prompt = 2
    out = await collect(_relay(chunked(b"".join(e + b"\n\n" for e in RUNNING), [5, 90]), t, wants, limit=1 << 20,
                               answer=Tapped()))
    assert t.tokens == (7, 3)  # the prompt once, each choice's completion tokens: what the engine did so far
    assert t.charged(200) == (7, 3)
    events = [json.loads(e[6:]) for e in out.split(b"\n\n") if e]
    assert [("usage" in e) for e in events] == [wants.running] * 3  # asked for or taken out again
    assert [e["choices"][0]["text"] for e in events] == ["a", "b", "c"]  # the rest of each event untouched
    assert events[0]["choices"][0]["logprobs"] == {"top_logprobs": [{"usage": -1.0}]}


def test_charged_without_a_count_is_the_reservation_when_the_engine_took_the_request():
    t = timer()
    t.bound = 500  # its tenant has no budget (nothing held): the bound is charged all the same
    assert t.charged(499) == (500, 0) and t.charged(200) == (500, 0)  # vLLM counts nothing it aborts
    assert t.charged(400) == (0, 0) and t.charged(503) == (0, 0)  # refused, or never reached an engine
    t.usage(USAGE)
    assert t.charged(499) == (3, 2)


async def test_relay_refuses_an_event_over_the_limit_with_an_error_event():
    big = b'data: {"choices":[{"text":"' + b"x" * 5000 + b'"}]}\n\n'
    tap = Tapped()
    out = await collect(_relay(chunked(EVENTS[0] + b"\n\n" + big, [10, 100, 3000]), timer(), Usage(True, False),
                               limit=4096, answer=tap))
    assert out.startswith(EVENTS[0] + b"\n\n") and b'"code": "response_too_large"' in out
    assert out.endswith(b"data: [DONE]\n\n") and len(out) < 1024
    assert tap.end is None, "an answer cut short is not complete: it is not stored"


@settings(max_examples=50, deadline=None)
@given(cuts=st.lists(st.integers(1, 200), max_size=8))
async def test_relay_body_notes_usage_split_across_chunks(cuts):
    body = json.dumps({"id": "x", "choices": [{"text": "usage: \"usage\":{"}], "usage": USAGE,
                       "kv_transfer_params": None}).encode()
    t = timer()
    tap = Tapped()
    assert await collect(_relay_body(chunked(body, cuts), t, limit=1 << 20, answer=tap)) == body
    assert b"".join(tap.seen) == body and tap.end is False
    assert t.tokens == (3, 2)


# A token spelled "usage" among a completion's top logprobs puts `"usage":` inside `choices`, before the real one.
DECOY = json.dumps({"id": "x", "choices": [{"text": "usage", "logprobs": {"top_logprobs": [{"usage": -0.1, "x": -2}]}}],
                    "usage": USAGE, "kv_transfer_params": None}).encode()


@settings(max_examples=50, deadline=None)
@given(cuts=st.lists(st.integers(1, len(DECOY) - 1), max_size=8))
async def test_usage_is_the_answers_own_not_a_token_spelled_usage(cuts):
    t = timer()
    assert await collect(_relay_body(chunked(DECOY, cuts), t, limit=1 << 20, answer=Tapped(False))) == DECOY
    assert t.tokens == (3, 2)
    assert _usage(DECOY) == USAGE


@pytest.fixture
async def engines():
    """Starts engines, each answering completions with one handler, on real sockets; None leaves a port closed."""
    runners, session = [], aiohttp.ClientSession()

    async def start(*handlers) -> SimpleNamespace:
        backends = []
        for handler in handlers:
            port = free_port()
            if handler is not None:
                app = web.Application()
                app.router.add_post("/v1/completions", handler)
                runners.append(web.AppRunner(app))
                await runners[-1].setup()
                await web.TCPSite(runners[-1], "127.0.0.1", port).start()
            engine = EngineClient(f"http://127.0.0.1:{port}", session)
            backends.append(Backend(engine, up=True, label=str(len(backends))))
        return Serving(router=Router(backends), admission=Admission(8, 8, 1), metrics=Metrics(10), tracer=None,
                       settings=SimpleNamespace(model_name="base", max_response_bytes=1 << 20), base=None, view=None,
                       usage=None, rollouts=None, shadows=None, compositions=None, capture=None)

    yield start
    for runner in runners:
        await runner.cleanup()
    await session.close()


REFUSED = None


async def answers(request: web.Request) -> web.Response:
    return web.json_response({"choices": [{"text": "ok"}], "usage": USAGE})


async def too_long(request: web.Request) -> web.Response:
    return web.json_response({"error": {"message": "too long", "code": 400}}, status=400)


class Caller:
    """A request whose client stays until `leave` is set."""

    state = SimpleNamespace(request_id="req-1")

    def __init__(self):
        self.leave = asyncio.Event()

    async def receive(self) -> dict:
        await self.leave.wait()
        return {"type": "http.disconnect"}


async def send(gw, t: RequestTimer | None = None, caller: Caller | None = None, **body) -> Response:
    ctx = RequestContext(body=CompletionRequest(prompt="x", **body), path="/v1/completions", request=caller or Caller(),
                         tenant=None, timer=t or timer(), answer=Tapped(stored=False))
    return await gw.send(ctx)


def held(closed: asyncio.Event, stream: bool):
    """An engine handler that holds its answer (a stream after one event) until the gateway closes the connection."""
    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream"})
        if stream:
            await response.prepare(request)
            await response.write(EVENTS[0] + b"\n\n")
        while request.transport is not None and not request.transport.is_closing():
            await asyncio.sleep(0.01)
        closed.set()
        return response

    return handler


async def deliver(response: Response, to_client=None) -> list[dict]:
    """Sends `response` to a client that stays; returns the messages it got."""
    sent = []

    async def collect(message: dict) -> None:
        sent.append(message)

    await response({"type": "http"}, Caller().receive, to_client or collect)
    return sent


async def test_send_retries_once_on_another_engine_when_one_cannot_be_reached(engines):
    gw, t = await engines(REFUSED, answers), timer()
    response = await send(gw, t)
    assert json.loads(response.body)["choices"][0]["text"] == "ok"  # a small answer, read whole
    await deliver(response)
    assert [b.up for b in gw.router.backends] == [False, True]
    assert t.m.prompt_tokens.labels("(base)")._value.get() == 3 and gw.router.backends[1].in_flight == 0


async def test_a_whole_answer_reaches_the_client_before_its_bookkeeping(engines):
    """The request's metrics, ledger and admission are settled once the bytes are out, not before they leave."""
    gw, t, seen = await engines(answers), timer(), []
    requests = t.m.requests.labels("completions", "(base)", "200")

    async def to_client(message: dict) -> None:
        seen.append((message["type"], requests._value.get(), gw.router.backends[0].in_flight))

    await deliver(await send(gw, t), to_client)
    assert seen == [("http.response.start", 0, 1), ("http.response.body", 0, 1)]
    assert requests._value.get() == 1 and gw.router.backends[0].in_flight == 0


async def test_a_whole_answer_that_cannot_be_sent_still_releases_its_admission(engines):
    gw, t = await engines(answers), timer()

    async def gone(message: dict) -> None:
        raise OSError("the client's connection broke")

    with pytest.raises(OSError):
        await deliver(await send(gw, t), gone)
    assert gw.router.backends[0].in_flight == 0
    assert t.m.requests.labels("completions", "(base)", "200")._value.get() == 1


async def test_send_gives_up_after_the_second_unreachable_engine(engines):
    gw = await engines(REFUSED, REFUSED)
    with pytest.raises(APIError) as e:
        await send(gw)
    assert e.value.status == 503 and e.value.code == "engine_unavailable"


async def test_send_maps_an_engine_refusal_and_releases_admission(engines):
    gw = await engines(too_long)
    with pytest.raises(APIError) as e:
        await send(gw)
    assert (e.value.status, e.value.code, e.value.message) == (400, "engine_rejected", "too long")
    assert gw.router.backends[0].in_flight == 0


async def test_send_refuses_non_finite_numbers_naming_the_field(engines):
    gw = await engines(answers)
    with pytest.raises(APIError) as e:
        await send(gw, min_p=float("nan"))
    assert e.value.status == 400 and e.value.param == "min_p"


async def broken(request: web.Request) -> web.Response:
    return web.json_response({"error": {"message": "engine dead", "code": 500}}, status=500)


async def test_an_engine_that_fails_requests_stops_drawing_them(engines):
    """Its requests end at once, so its in-flight count stays 0; without the penalty it would get every request."""
    gw = await engines(broken, answers)
    gw.router.backends[1].in_flight = 1  # the healthy one looks busier
    with pytest.raises(APIError) as e:
        await send(gw)
    assert e.value.status == 502 and e.value.code == "engine_error"
    assert json.loads((await send(gw)).body)["choices"][0]["text"] == "ok"


async def test_a_client_leaving_a_non_streamed_answer_ends_the_engine_request(engines):
    closed, caller, t = asyncio.Event(), Caller(), timer()
    gw = await engines(held(closed, stream=False))
    sending = asyncio.ensure_future(send(gw, t, caller))
    await asyncio.sleep(0.1)  # the request reaches the engine; nothing to wait on for the client leaving
    caller.leave.set()
    with pytest.raises(APIError) as e:
        await asyncio.wait_for(sending, 5)
    assert (e.value.status, e.value.code) == (499, "client_closed_request")
    await asyncio.wait_for(closed.wait(), 5)
    assert gw.router.backends[0].in_flight == 0 and not asyncio.current_task().cancelling()


async def test_a_client_leaving_a_stream_ends_it_and_the_engine_request(engines):
    closed, caller, t = asyncio.Event(), Caller(), timer()
    gw = await engines(held(closed, stream=True))
    response = await send(gw, t, caller, stream=True)
    sent = []

    async def to_client(message: dict) -> None:
        sent.append(message)
        if message.get("body"):
            caller.leave.set()  # the client leaves once the first event reached it

    await asyncio.wait_for(response({"type": "http"}, caller.receive, to_client), 5)
    await asyncio.wait_for(closed.wait(), 5)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1]["body"] == EVENTS[0] + b"\n\n" and gw.router.backends[0].in_flight == 0
    assert t.m.requests.labels("completions", "(base)", "200")._value.get() == 1
    assert not asyncio.current_task().cancelling()


def test_the_reservation_reads_only_the_fields_of_the_requests_own_kind():
    """A completions request carrying a chat field (passed through as an extra) cannot make its bound negative."""
    from server.gateway.serving import token_bound
    from server.core.protocol import ChatCompletionRequest

    gw = SimpleNamespace(settings=SimpleNamespace(max_model_len=None), base=SimpleNamespace(context_len=1024))
    sneaky = CompletionRequest(prompt=["a", "b"], n=2, max_completion_tokens=-10 ** 15)
    assert token_bound(gw, sneaky, 100) == 2 * 2 * 16 + 100  # vLLM's default of 16 tokens per completion
    assert token_bound(gw, CompletionRequest(prompt=[1, 2, 3], max_tokens=5), 30) == 5 + 30
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], n=3)
    assert token_bound(gw, chat, 50) == 3 * 1024 + 50  # no limit: the context
