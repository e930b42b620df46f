"""Continuous batching in ``specframe serve``: a real uvicorn server (in this process, on 127.0.0.1 and a free
port) on the tiny fp64 Llama of tests/test_serve.py, driven by the official ``openai`` client from threads.

The server's scheduler calls a :class:`StepGate` before every step; the test opens it step by step, so
every interleaving asserted here (all requests queued before the first step, a request joining while
another runs, a client leaving mid-stream, a full queue) is forced, not timed. No sleeps, no wall-clock
thresholds; every wait is bounded and fails the test with a message.

With fp64 weights, a batched transformers forward equals the solo one bit for bit (tests/test_hf_batch.py),
so every answer must equal its own solo plain decoding, token for token.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from specframe import SpecGenerator, Target  # noqa: E402
from specframe.serve import create_app  # noqa: E402
from test_serve import MODEL, free_port, reference, stream_text, tiny_dir  # noqa: E402,F401

WAIT_S = 120  # the most any wait below may take before the test fails (never reached when things work)


class StepGate:
    """``before_step`` of the server's scheduler: blocks the scheduler's thread before each step until the test
    allows it. Records, per step, (requests joining, requests active) of the batch."""

    def __init__(self):
        self.cond = threading.Condition()
        self.credits, self.open, self.held = 0, False, False
        self.batch = None
        self.seen: list[tuple[int, int]] = []

    def __call__(self, size: int) -> None:
        with self.cond:
            self.held = True
            self.cond.notify_all()
            if not self.cond.wait_for(lambda: self.open or self.credits > 0, WAIT_S):
                raise RuntimeError("the test never let the scheduler step")
            if not self.open:
                self.credits -= 1
            self.held = False
            self.seen.append((len(self.batch.joining), len(self.batch.active)))
            self.cond.notify_all()

    def wait(self, predicate, what: str) -> None:
        """Until ``predicate(gate)`` holds (re-checked on every gate event, and every 50 ms for what changes
        elsewhere: the server's queue). Bounded: fails after WAIT_S."""
        with self.cond:
            for _ in range(WAIT_S * 20):
                if predicate(self):
                    return
                self.cond.wait(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def step(self, n: int = 1) -> None:
        """Let the scheduler run ``n`` steps and wait until it holds before the next one (or is idle)."""
        with self.cond:
            done = len(self.seen) + n
            self.credits += n
            self.cond.notify_all()
        busy = self.batch
        self.wait(lambda g: len(g.seen) >= done and (g.held or not busy.busy), f"{n} step(s)")

    def release(self) -> None:
        with self.cond:
            self.open = True
            self.cond.notify_all()


class InProcessServer:
    """uvicorn serving ``create_app(...)`` on a thread of this process."""

    def __init__(self, generator: SpecGenerator, gate: StepGate, **options):
        self.app = create_app(generator, model_name=MODEL, before_step=gate, **options)
        self.scheduler = self.app.state.worker
        gate.batch = self.scheduler.batch
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        ready = threading.Event()
        for _ in range(WAIT_S * 20):
            if self.server.started:
                ready.set()
                break
            ready.wait(0.05)
        assert ready.is_set(), "uvicorn did not start"

    def client(self, **kwargs) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "unused"), max_retries=0,
                             timeout=WAIT_S, **kwargs)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and not line.startswith("#"))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)
        self.scheduler.stop()


@pytest.fixture
def serve_gated(tiny_dir):
    """``serve_gated(policy="bastion", **create_app options)`` → (server, gate); stopped after the test."""
    started: list[InProcessServer] = []

    def start(policy: str = "bastion", **options):
        gate = StepGate()
        srv = InProcessServer(SpecGenerator(Target.load(str(tiny_dir), dtype="float64"), policy), gate, **options)
        started.append((srv, gate))
        return srv, gate

    yield start
    for srv, gate in started:
        gate.release()
        srv.stop()


def arrived(srv: InProcessServer, n: int):
    """A gate predicate: the scheduler holds before a step and ``n`` requests are in its batch or queue."""
    sched = srv.scheduler
    return lambda g: g.held and sched.queue.qsize() + (sched.next is not None) + sched.batch.size == n


def solo(reference, prompt: str, n: int, **sampling) -> list[int]:
    return reference.generate(reference.target.encode(prompt, chat=False), n, **sampling).token_ids


def streamed_ids(client, prompt: str, n: int, **sampling) -> tuple[list[int], str, str]:
    """A streamed completion: (token ids from the final chunk's ``specframe`` field, text, finish reason)."""
    text, chunks = stream_text(client.completions.create(model=MODEL, prompt=prompt, max_tokens=n, stream=True,
                                                         **sampling), chat=False)
    last = [c for c in chunks if c.choices][-1]
    return last.specframe["token_ids"], text, last.choices[0].finish_reason


def test_16_concurrent_streamed_requests_are_batched_and_each_equals_its_solo_run(serve_gated, reference):
    """16 clients at once, held until all are queued: the batch of 8 fills, the other 8 join as places free;
    none is lost, mixed or truncated, and each answer is its own solo plain decoding."""
    srv, gate = serve_gated(max_batch=8, max_queue=16)
    prompts = [f"Question {i}: name {i} rivers." for i in range(16)]
    lengths = [6 + (i % 5) * 3 for i in range(16)]  # requests finish at different steps
    expected = [solo(reference, p, n, temperature=0) for p, n in zip(prompts, lengths)]
    assert len({tuple(e) for e in expected}) >= 12  # distinct, checkable answers
    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(streamed_ids, srv.client(), p, n, temperature=0) for p, n in zip(prompts, lengths)]
        gate.wait(arrived(srv, 16), "all 16 requests to arrive")
        gate.release()
        results = [f.result(timeout=WAIT_S) for f in futures]
    for (ids, text, reason), want, n in zip(results, expected, lengths):
        assert ids == want and text == reference.target.decode(want)
        assert reason == ("length" if len(want) == n else "stop")
    assert max(active for _, active in gate.seen) == 8  # the batch really held 8 requests at once
    assert srv.metric("vllm:request_success_total") == 16
    assert srv.metric('specframe:batch_size_count') == len(gate.seen)


def test_a_request_joins_a_running_batch_and_the_first_leaves_while_it_runs(serve_gated, reference):
    srv, gate = serve_gated(max_batch=4)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(streamed_ids, srv.client(), "The river runs", 24, temperature=0)
        gate.wait(lambda g: g.held and srv.scheduler.batch.size == 1, "the first request")
        gate.step(3)  # the first request runs alone for three steps
        second = pool.submit(streamed_ids, srv.client(), "count one two", 40, temperature=0)
        gate.wait(arrived(srv, 2), "the second request to arrive")
        gate.step()  # it joins at the next step
        assert srv.scheduler.batch.size == 2
        gate.release()
        a, b = first.result(timeout=WAIT_S), second.result(timeout=WAIT_S)
    assert a[0] == solo(reference, "The river runs", 24, temperature=0)
    assert b[0] == solo(reference, "count one two", 40, temperature=0)
    assert (0, 1) in gate.seen[:3] and any(active == 2 for _, active in gate.seen)  # alone, then together
    assert gate.seen[-1] == (0, 1)  # the first left; the second finished alone


def test_a_long_prompt_prefills_in_chunks_while_the_batch_goes_on(serve_gated, reference):
    """A 200-token prompt joins a running request with 32-token prefill chunks: the running request commits
    tokens on every step the long one spends prefilling, and both answers equal their solo runs."""
    srv, gate = serve_gated(max_batch=4, prefill_chunk=32)
    long_prompt = " ".join(["the river"] * 100)
    long_ids = reference.target.encode(long_prompt, chat=False)
    assert len(long_ids) > 4 * 32
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(streamed_ids, srv.client(), "The river runs", 40, temperature=0)
        gate.wait(lambda g: g.held and srv.scheduler.batch.size == 1, "the running request")
        gate.step(2)
        joining = pool.submit(lambda: srv.client().completions.create(model=MODEL, prompt=long_ids, max_tokens=8,
                                                                      temperature=0))
        gate.wait(arrived(srv, 2), "the long prompt to arrive")
        gate.release()
        a, b = running.result(timeout=WAIT_S), joining.result(timeout=WAIT_S)
    prefilling = [s for s in gate.seen if s == (1, 1)]
    assert len(prefilling) >= 3  # several steps with the long prompt still prefilling and the other one going on
    assert a[0] == solo(reference, "The river runs", 40, temperature=0)
    assert b.specframe["token_ids"] == reference.generate(long_ids, 8).token_ids


def test_a_client_that_disconnects_mid_stream_leaves_the_batch_at_the_next_step(serve_gated, reference):
    srv, gate = serve_gated(max_batch=4)
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(streamed_ids, srv.client(), "count one two", 30, temperature=0)
        gate.wait(lambda g: g.held and srv.scheduler.batch.size == 1, "the other request")
        received: list[str] = []

        def read_then_leave():  # the leaving client: reads until its first piece of text, then closes
            stream = srv.client().completions.create(model=MODEL, prompt="The river runs", max_tokens=200,
                                                     temperature=0, stream=True)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    received.append(chunk.choices[0].text)
                    break
            stream.close()

        reader = threading.Thread(target=read_then_leave)
        reader.start()
        gate.wait(arrived(srv, 2), "the streamed request")
        leaving = lambda: [x for x in srv.scheduler.live.values() if x.job.max_tokens == 200]  # noqa: E731
        for _ in range(100):  # step until the server has sent the leaving client some text
            gate.step()
            if leaving() and leaving()[0].text.sent:
                break
        reader.join(WAIT_S)
        assert received and not reader.is_alive()
        gate.wait(lambda g: g.held and any(m.req.cancelled for m in srv.scheduler.batch.active),
                  "the server to see the disconnect")
        gate.step()
        assert srv.scheduler.batch.size == 1  # it left at that step; the other goes on
        gate.release()
        assert other.result(timeout=WAIT_S)[0] == solo(reference, "count one two", 30, temperature=0)
    assert srv.metric('vllm:request_success_total{finished_reason="abort"') == 1
    assert srv.metric("vllm:generation_tokens_total") < 200 + 30


def test_a_full_queue_answers_503_with_retry_after(serve_gated):
    srv, gate = serve_gated(policy="ar", max_batch=1, max_queue=1, api_key="sekret")
    client = srv.client(api_key="sekret")
    with ThreadPoolExecutor(2) as pool:
        running = pool.submit(client.completions.create, model=MODEL, prompt="The river runs", max_tokens=4,
                              temperature=0)
        gate.wait(lambda g: g.held and srv.scheduler.batch.size == 1, "the running request")
        waiting = pool.submit(client.completions.create, model=MODEL, prompt="hi", max_tokens=3, temperature=0)
        gate.wait(lambda g: srv.scheduler.queue.qsize() + (srv.scheduler.next is not None) == 1, "a waiting request")
        response = httpx.post(f"{srv.url}/v1/completions", headers={"Authorization": "Bearer sekret"},
                              json={"model": MODEL, "prompt": "hi", "max_tokens": 2}, timeout=30)
        assert response.status_code == 503 and response.headers["retry-after"].isdigit()
        assert response.json()["error"]["code"] == "queue_full"
        gate.release()
        assert running.result(timeout=WAIT_S).usage.completion_tokens == 4
        assert waiting.result(timeout=WAIT_S).usage.completion_tokens == 3


def test_api_key_is_required_on_v1(serve_gated):
    srv, gate = serve_gated(policy="ar", api_key="sekret")
    gate.release()
    assert httpx.get(f"{srv.url}/v1/models").status_code == 401
    assert httpx.get(f"{srv.url}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(f"{srv.url}/health").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        srv.client(api_key="wrong").models.list()
    assert [m.id for m in srv.client(api_key="sekret").models.list().data] == [MODEL]
    body = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "hi"}).json()
    assert body["error"]["code"] == "invalid_api_key"


def test_seeded_samples_in_a_batch_equal_their_solo_samples(serve_gated, reference):
    """Four sampled requests (each its own temperature, top-p, seed) decoded together: each is the sample its
    seed gives alone with plain decoding — the batch changes no request's randomness."""
    srv, gate = serve_gated(max_batch=4)
    settings = [dict(temperature=1.0, seed=7), dict(temperature=0.7, top_p=0.9, seed=8),
                dict(temperature=1.3, seed=9), dict(temperature=1.0, seed=7)]
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(streamed_ids, srv.client(), "The river runs", 16, **s) for s in settings]
        gate.wait(arrived(srv, 4), "all four requests")
        gate.release()
        outs = [f.result(timeout=WAIT_S)[0] for f in futures]
    for out, s in zip(outs, settings):
        assert out == solo(reference, "The river runs", 16, **s)
    assert outs[0] == outs[3] and len({tuple(o) for o in outs}) >= 2


def test_bad_input_while_a_batch_runs_is_a_4xx_and_the_batch_goes_on(serve_gated, reference):
    srv, gate = serve_gated(max_batch=2)
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(streamed_ids, srv.client(), "The river runs", 12, temperature=0)
        gate.wait(lambda g: g.held and srv.scheduler.batch.size == 1, "the running request")
        for body in ({"model": MODEL, "prompt": "hi", "tools": [{"type": "function"}]},
                     {"model": MODEL, "prompt": [10 ** 7]}, {"model": MODEL, "prompt": "hi", "max_tokens": 10 ** 6},
                     {"model": MODEL, "prompt": "hi", "logprobs": 99}):
            response = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=30)
            assert 400 <= response.status_code < 500, response.text
        gate.release()
        assert running.result(timeout=WAIT_S)[0] == solo(reference, "The river runs", 12, temperature=0)


def test_a_request_the_shared_cache_can_never_hold_is_a_400_not_a_hang(serve_gated):
    """A room whose cache all requests share admits a request by its cells; one that would not fit even alone
    is answered 400 at once (it would otherwise wait forever)."""
    srv, gate = serve_gated(max_batch=2)
    gate.release()
    batch = srv.scheduler.batch  # as if its room's shared cache held 20 tokens
    batch.has_room = lambda req=None: batch.size < batch.capacity and (
        req is None or len(req.prompt_ids) + req.max_new_tokens < 20)
    ok = srv.client().completions.create(model=MODEL, prompt="hi", max_tokens=4, temperature=0)
    assert ok.usage.completion_tokens == 4
    with pytest.raises(openai.BadRequestError, match="does not fit"):
        srv.client().completions.create(model=MODEL, prompt="The river runs", max_tokens=40, temperature=0)


def test_an_unexpected_error_in_a_step_fails_that_batch_and_the_server_goes_on(serve_gated, reference):
    srv, gate = serve_gated(max_batch=2)
    gate.release()
    sched, finish = srv.scheduler, srv.scheduler._finish
    broken = [True]

    def finish_once_broken(live, req):  # a bug striking while a request finishes
        if broken.pop() if broken else False:
            raise RuntimeError("boom")
        return finish(live, req)

    sched._finish = finish_once_broken
    with pytest.raises(openai.InternalServerError, match="boom"):
        srv.client().completions.create(model=MODEL, prompt="The river runs", max_tokens=4, temperature=0)
    assert sched.batch.size == 0 and not sched.live
    out = srv.client().completions.create(model=MODEL, prompt="The river runs", max_tokens=6, temperature=0)
    assert out.specframe["token_ids"] == solo(reference, "The river runs", 6, temperature=0)
