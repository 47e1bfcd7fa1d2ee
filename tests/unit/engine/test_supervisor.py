import asyncio

from server.engine.routing import Backend
from server.engine.supervisor import Supervisor
from server.observability.metrics import Metrics
from tests.helpers.in_process import FakeEngine


class ProbedEngine(FakeEngine):
    """Answers health probes from a script (True: 200, False: refused, None: timed out) and notes, at each
    probe, whether the supervisor held the engine up after the one before."""

    def __init__(self, answers):
        super().__init__()
        self.answers, self.backend, self.seen, self.finished = list(answers), None, [], asyncio.Event()
        self.url = "http://engine"

    async def healthy(self):
        self.seen.append(self.backend.up)
        if len(self.seen) > len(self.answers):
            self.finished.set()
            await asyncio.Event().wait()
        return self.answers[len(self.seen) - 1]


async def states(answers, tolerated=2) -> list[bool]:
    engine = ProbedEngine(answers)
    engine.backend = backend = Backend(engine, up=True)
    supervisor = Supervisor([backend], Metrics(10), 1.0, interval=0, slow_probes_tolerated=tolerated)
    task = asyncio.create_task(supervisor.run())
    await asyncio.wait_for(engine.finished.wait(), 5)
    task.cancel()
    return engine.seen[1:]


async def test_a_busy_engine_that_misses_a_few_probes_stays_up():
    assert await states([None, None, True, None]) == [True, True, True, True]


async def test_an_engine_that_keeps_missing_probes_goes_down_and_comes_back():
    assert await states([None, None, None, None, True]) == [True, True, False, False, True]


async def test_a_refused_probe_takes_the_engine_down_at_once():
    assert await states([False, None, True]) == [False, False, True]
