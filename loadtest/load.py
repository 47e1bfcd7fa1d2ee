"""Load generator for OpenAI-compatible servers, on Locust, with LLM measurements and a Zipf mix of adapters.

Locust runs the users, bounds the run and counts failures; each request streams and records time to first
token (TTFT), inter-token latency (ITL) and end-to-end latency exactly (Locust's own percentiles round).
Closed loop: --concurrency users, each sending its next request when the last one ends. Open loop: --rate
arrivals per second, fixed or Poisson, whatever the server's pace.

    python -m loadtest.load --url http://127.0.0.1:8000 --concurrency 32 --duration 60 \\
        --adapters bench-0,bench-1,bench-2 --zipf 1.0 --json out.json --markdown out.md --plot out.png
"""

from gevent import monkey

monkey.patch_all()

import json  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
from locust import HttpUser, constant, events, task  # noqa: E402
from locust.env import Environment  # noqa: E402

from loadtest.workload import Workload, markdown, parser, plot, summarize  # noqa: E402


def _read_stream(r) -> tuple[float | None, int]:
    """(time of the first token, completion tokens from the usage event) of a streamed answer."""
    first, tokens = None, 0
    for line in r.iter_lines():
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if event.get("choices") and first is None:
            first = time.perf_counter()
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
    return first, tokens


def _read_answer(r) -> tuple[float, int]:
    """(time the whole answer arrived, completion tokens) of a non-streamed answer."""
    tokens = r.json()["usage"]["completion_tokens"]
    return time.perf_counter(), tokens


def send_one(client, workload: Workload) -> None:
    """One streamed completion through locust's client, recorded as a sample of `workload`."""
    name, body = workload.body()
    start = time.perf_counter()
    first, tokens, error = None, 0, None
    auth = {"Authorization": f"Bearer {workload.args.api_key}"} if workload.args.api_key else None
    try:
        with client.post("/v1/completions", json=body, stream=True, name=name, catch_response=True, headers=auth,
                         timeout=workload.args.request_timeout) as r:
            if r.status_code != 200:
                error = f"HTTP {r.status_code}"
            else:
                first, tokens = _read_answer(r) if workload.args.no_stream else _read_stream(r)
                error = "no tokens" if first is None or tokens == 0 else None
            if error:
                r.failure(error)
    except Exception as e:  # a broken connection is a result to count, not a crash
        error = type(e).__name__
    end = time.perf_counter()
    sample = {"adapter": name, "start": start, "end": end, "error": error, "tokens": tokens}
    if error is None:
        sample.update(ttft=first - start, e2e=end - start, itl=(end - first) / (tokens - 1) if tokens > 1 else None)
    workload.samples.append(sample)


def open_loop(send, workload: Workload) -> None:
    """Generates every arrival from one user; each request runs in its own greenlet."""
    args = workload.args
    rng = random.Random(args.seed + 1)
    running: set = set()
    next_at = time.perf_counter()
    while True:
        next_at += rng.expovariate(args.rate) if args.arrivals == "poisson" else 1 / args.rate
        gevent.sleep(max(0.0, next_at - time.perf_counter()))
        if len(running) >= args.max_outstanding:
            workload.arrivals_skipped += 1  # bounded memory: the server is past saturation
            continue
        g = gevent.spawn(send)
        running.add(g)
        g.link(running.discard)


def make_user(workload: Workload) -> type[HttpUser]:
    class LLMUser(HttpUser):
        wait_time = constant(0)
        host = workload.args.url

        @task
        def closed_loop(self):
            if workload.args.rate:
                open_loop(lambda: send_one(self.client, workload), workload)
            else:
                send_one(self.client, workload)

    return LLMUser


def run(args) -> dict:
    workload = Workload(args)
    user = make_user(workload)
    env = Environment(user_classes=[user], events=events)
    runner = env.create_local_runner()
    users = 1 if args.rate else args.concurrency
    runner.start(users, spawn_rate=users)
    started = time.perf_counter()
    deadline = started + args.duration

    def stop_when_done():
        while time.perf_counter() < deadline:
            if args.requests and len(workload.samples) >= args.requests:
                break
            gevent.sleep(0.1)
        runner.quit()

    gevent.spawn(stop_when_done)
    runner.greenlet.join()
    elapsed = time.perf_counter() - started
    return summarize(args, workload, elapsed, env)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    report = run(args)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(report))
    if args.plot:
        plot(report, args.plot)
    print(markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
