"""llama.cpp's own ``llama-server`` as a peer of ``specframe bench`` (peers ``llama-server``,
``llama-server-ngram`` and ``llama-server-draft`` of the llama.cpp backend).

The binary is built once by ``bash scripts/build_llama_server.sh`` from the llama.cpp that the installed
llama-cpp-python vendors (same kernels as the backend) into
``<specframe cache>/llama-server/<llama-cpp-python version>/llama-server``; ``$SPECFRAME_LLAMA_SERVER``
names a binary elsewhere.

A :class:`LlamaServerPeer` runs one server on a free loopback port (127.0.0.1 only) with the backend's GGUF
file, threads (``-t``/``-tb``), context (``-c``), one slot (``-np 1``), 512-token batches (as the backend
consumes a prompt) and flash attention as the backend has it; its log goes to a temporary file whose tail
ends up in the error when the server dies or never gets ready. Each :meth:`LlamaServerPeer.run` POSTs the
prompt as token ids to ``/completion``, with the sampling settings (``temperature`` 0 is greedy; ``min_p``
0, no repeat penalty, no dry/typical/xtc) and ``return_tokens``, in two requests: all but the last prompt
token (generating nothing, reusing no earlier cache), then the whole prompt reusing just that prefix, so
that the last prompt token is decoded on its own as specframe's prefill (and the ``llama-cpp`` peer) does;
greedy output is then token for token the backend's ``ar`` output (see :meth:`LlamaServerPeer._generate`).
The server ends a generation after an end-of-generation token (``stop_type`` ``eos``) and returns that
token as the last of ``tokens`` (``ignore_eos`` stays false: true would ban the token by a logit bias):
the same convention as specframe.

Speculation (``llama-server-ngram``): ``--spec-type ngram-mod`` with the settings of llama.cpp's own
``--spec-default`` (``--spec-ngram-mod-n-match 24 --spec-ngram-mod-n-min 48 --spec-ngram-mod-n-max 64``;
docs/speculative.md of the vendored llama.cpp), its recommended training-free speculation. A short check
(not a benchmark; SmolLM2-135M Q4_1, 1 thread on a 2-core machine loaded by other jobs, 3 MT-Bench + 3
HumanEval prompts sent in one request each, 96 greedy tokens, median of 3 interleaved rounds; tokens/s over
each request's wall time, tokens drafted / accepted per round): plain 50.0; ngram-simple 12/48 (its
defaults) 46.7, 0 / 0; ngram-simple 4/16 41.8, 145 / 22; ngram-map-k 12/48 52.5, 17 / 17; ngram-mod
24/48/64 52.4, 49 / 49; ngram-mod 16/4/16 52.7, 57 / 57. Every output equalled plain decoding's. The types
that draft at all gain ≈ 5 %, within this check's noise; of them ngram-mod drafts the most at its defaults.

ngram-mod's hash pool is shared across requests (and slots) and learns from every prompt and output, and
no request field or server option resets it (it resets itself only when 25 % full or after a streak of
rejected drafts). A single request must not profit from earlier ones (a repeated benchmark prompt would be
drafted whole), so the peer restarts the server before every request but the first (``fresh_per_request``,
on for every speculation but ``ngram-simple``, which only reads the request's own tokens). A restart takes
≈ 0.3 s for SmolLM2-135M on 1 thread (model load ≈ 0.25 s, warm-up ≈ 0.03 s). ``specframe bench`` has it
done by ``run.prepare()`` before it starts the clock; a ``run`` that still needs one does it first and
reports it as ``last_timings["restart_ms"]``.

Serving (``scripts/bench_serve.py``): ``parallel=N`` starts the server with ``-np N`` slots (give ``n_ctx`` =
N × the context of one slot: without ``-kvu`` llama-server splits ``-c`` evenly among its slots, and with an
explicit ``-np`` its unified KV cache is off by default), ``extra_args`` appends flags, and
:meth:`LlamaServerPeer.stream` sends one streamed greedy ``/completion`` (token ids in, token ids out, no prompt
cache) that is safe to call from several threads at once: concurrent calls are concurrent requests, which the
server decodes together (continuous batching, on by default). The defaults (``parallel=1``, no extra flags)
are the peer ``specframe bench`` runs.

Draft model (``llama-server-draft``): ``--spec-type draft-simple -md DRAFT.gguf`` (this llama.cpp's names:
``-md`` is ``--spec-draft-model``; ``draft-simple`` is the type of a plain draft model, beside
``draft-eagle3``/``draft-mtp``/``draft-dflash``/``draft-dspark``), with llama.cpp's own draft settings
(``--spec-draft-n-max 3``, ``--spec-draft-n-min 0``, ``--spec-draft-p-min 0.0``; the draft runs on the
same ``-t``/``-tb`` threads and context), what a user of the server gets from ``-md`` alone. The draft
model keeps a KV cache of its own that a later request could reuse, so this peer too gets a fresh server
per request (outside bench's clock).
"""

from __future__ import annotations

import atexit
import importlib.metadata
import json
import os
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from specframe.errors import SpecframeError
from specframe.target import cache_dir

BUILD_HINT = "run `bash scripts/build_llama_server.sh`"
NGRAM_SPEC = "ngram-mod"  # the --spec-type of peer llama-server-ngram
DRAFT_SPEC = "draft-simple"  # the --spec-type of peer llama-server-draft (with -md DRAFT.gguf)
# --spec-type -> its settings (llama.cpp's docs/speculative.md)
SPEC_ARGS: dict[str, list[str]] = {
    "ngram-mod": ["--spec-ngram-mod-n-match", "24", "--spec-ngram-mod-n-min", "48", "--spec-ngram-mod-n-max", "64"],
    "ngram-simple": [],
    "ngram-map-k": [],
    DRAFT_SPEC: [],  # with -md: llama.cpp's own draft defaults
}
DRAFT_MODEL_SPECS = (DRAFT_SPEC,)  # the speculation types that read a draft model (-md)
# Speculation whose state outlives a request (ngram-mod's shared hash pool, ngram-map-k's per-key
# statistics) gets a fresh server per request; ngram-simple only reads the current request's tokens.
STATELESS_SPEC = (None, "ngram-simple")
READY_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 3600.0
SAMPLERS = ["top_k", "top_p", "min_p", "temperature"]  # llama.cpp's order, without dry/typical/xtc


def server_binary() -> Path:
    """The ``llama-server`` binary: ``$SPECFRAME_LLAMA_SERVER``, else the one the build script installed for
    the installed llama-cpp-python version."""
    override = os.environ.get("SPECFRAME_LLAMA_SERVER")
    if override:
        path = Path(override).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise SpecframeError(f"SPECFRAME_LLAMA_SERVER={override} is not an executable file")
        return path
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        raise SpecframeError("the llama-server peers need llama-cpp-python (its llama.cpp is what the server is "
                             f"built from): pip install llama-cpp-python, then {BUILD_HINT}") from None
    path = cache_dir() / "llama-server" / version / "llama-server"
    if not path.is_file():
        raise SpecframeError(f"llama-server is not built ({path} is missing): {BUILD_HINT}")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LlamaServerPeer:
    """One ``llama-server`` process serving ``gguf_path``; ``run`` generates, ``close`` stops it (also at
    exit and when used as a context manager)."""

    def __init__(self, gguf_path: str | Path, threads: int, n_ctx: int, spec: str | None = None,
                 flash_attn: bool = True, *, draft_model: str | Path | None = None, note: str = "",
                 fresh_per_request: bool | None = None, binary: str | Path | None = None,
                 ready_timeout_s: float = READY_TIMEOUT_S, parallel: int = 1, extra_args: Sequence[str] = ()):
        if spec is not None and spec not in SPEC_ARGS:
            raise SpecframeError(f"unknown llama-server speculation '{spec}'; known: {', '.join(SPEC_ARGS)}")
        if (spec in DRAFT_MODEL_SPECS) != (draft_model is not None):
            why = "needs a draft model (-md DRAFT.gguf)" if draft_model is None else f"takes no draft model; use {DRAFT_SPEC}"
            raise SpecframeError(f"llama-server speculation '{spec}' {why}")
        self.draft_model = Path(draft_model) if draft_model is not None else None
        if self.draft_model is not None and not self.draft_model.is_file():
            raise SpecframeError(f"llama-server draft model not found: {self.draft_model}")
        self.note = note  # said after the settings in :meth:`description` (e.g. that the draft is the target itself)
        self.binary = Path(binary) if binary is not None else server_binary()
        self.gguf_path, self.threads, self.n_ctx, self.spec = Path(gguf_path), int(threads), int(n_ctx), spec
        self.flash_attn = bool(flash_attn)
        self.fresh_per_request = spec not in STATELESS_SPEC if fresh_per_request is None else fresh_per_request
        self.ready_timeout_s = ready_timeout_s
        self.parallel = int(parallel)  # -np: server slots (requests decoded together)
        if self.parallel < 1:
            raise SpecframeError(f"llama-server needs at least one slot, got parallel={parallel}")
        self.extra_args = [str(a) for a in extra_args]
        self.last_timings: dict = {}
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self._log_path: str | None = None
        self._served = False  # the running server has answered a request
        atexit.register(self.close)
        self._start()

    # ------------------------------------------------------------------ process
    def command(self) -> list[str]:
        cmd = [str(self.binary), "-m", str(self.gguf_path), "--host", "127.0.0.1", "--port", str(self.port),
               "-t", str(self.threads), "-tb", str(self.threads), "-c", str(self.n_ctx), "-np", str(self.parallel),
               "-b", "512", "-ub", "512", "-fa", "on" if self.flash_attn else "off",
               "--cache-ram", "0", "--no-webui", "--log-colors", "off"]
        if self.spec is not None:
            cmd += ["--spec-type", self.spec, *SPEC_ARGS[self.spec]]
        if self.draft_model is not None:
            cmd += ["-md", str(self.draft_model)]
        return cmd + self.extra_args

    def description(self) -> str:
        """What this server runs, in words (bench's report notes it for draft-model peers)."""
        what = f"llama-server on {self.gguf_path.name}"
        if self.spec is not None:
            what += f", --spec-type {self.spec} {' '.join(SPEC_ARGS[self.spec])}".rstrip()
        if self.draft_model is not None:
            what += (f"; draft: {self.draft_model} (-md; llama.cpp's draft defaults: --spec-draft-n-max 3, "
                     f"--spec-draft-p-min 0.0)")
        return what + (f"; {self.note}" if self.note else "")

    def _start(self) -> None:
        self.port = _free_port()
        fd, self._log_path = tempfile.mkstemp(prefix="specframe-llama-server-", suffix=".log")
        try:
            self.proc = subprocess.Popen(self.command(), stdin=subprocess.DEVNULL, stdout=fd, stderr=subprocess.STDOUT)
        except OSError as err:
            self._remove_log()
            raise SpecframeError(f"could not start llama-server {self.binary}: {err.strerror}; {BUILD_HINT}") from None
        finally:
            os.close(fd)
        self._served = False
        try:
            self._wait_ready()
        except SpecframeError:
            self.close()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SpecframeError(f"llama-server exited with code {self.proc.returncode} before it was ready "
                                     f"(log: {self.log_tail()})")
            try:
                with urllib.request.urlopen(self._url("/health"), timeout=1.0) as reply:
                    if reply.status == 200:
                        return
            except (urllib.error.URLError, OSError):  # not listening yet, or 503 while loading the model
                pass
            time.sleep(0.02)  # polling interval
        raise SpecframeError(f"llama-server was not ready within {self.ready_timeout_s:.0f} s (log: {self.log_tail()})")

    def log_tail(self, lines: int = 3) -> str:
        """The last non-empty lines of the server's log, on one line."""
        try:
            text = Path(self._log_path).read_text(errors="replace") if self._log_path else ""
        except OSError:
            text = ""
        tail = [line.strip() for line in text.splitlines() if line.strip()][-lines:]
        return " | ".join(tail) or "empty"

    def _remove_log(self) -> None:
        if self._log_path:
            Path(self._log_path).unlink(missing_ok=True)
            self._log_path = None

    def _stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._remove_log()

    def close(self) -> None:
        """Stop the server (terminate, then kill) and remove its log."""
        self._stop()
        atexit.unregister(self.close)

    def __enter__(self) -> "LlamaServerPeer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ requests
    def _url(self, route: str) -> str:
        return f"http://127.0.0.1:{self.port}{route}"

    def _post(self, route: str, body: dict) -> dict:
        request = urllib.request.Request(self._url(route), data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as reply:
                return json.loads(reply.read())
        except urllib.error.HTTPError as err:
            detail = err.read().decode("utf-8", "replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise SpecframeError(f"llama-server answered HTTP {err.code}: {' '.join(str(detail).split())}") from None
        except (urllib.error.URLError, OSError) as err:
            raise SpecframeError(f"llama-server did not answer ({err}; log: {self.log_tail()})") from None

    def run(self, ids: list[int], max_new_tokens: int, temperature: float = 0.0, top_k: int = 0,
            top_p: float = 1.0, seed: int | None = None) -> list[int]:
        """New token ids for prompt ``ids``: at most ``max_new_tokens``, ending after an end-of-generation
        token when one comes. :attr:`last_timings` gets the server's ``timings`` (``draft_n`` and
        ``draft_n_accepted`` 0 where it drafted nothing) and ``restart_ms``, the restart this call began with
        (0 unless ``fresh_per_request``): the call's wall time includes it."""
        if len(ids) + max_new_tokens > self.n_ctx:
            raise SpecframeError(f"llama-server runs with a context of {self.n_ctx} tokens; the prompt ({len(ids)}) + "
                                 f"{max_new_tokens} new tokens do not fit")
        if self.proc is None:
            raise SpecframeError("this llama-server peer is closed")
        restart_s = self.prepare()
        body = {"n_predict": int(max_new_tokens), "stream": False, "temperature": max(float(temperature), 0.0),
                "top_k": int(top_k or 0), "top_p": float(top_p), "min_p": 0.0, "repeat_penalty": 1.0,
                "samplers": SAMPLERS, "ignore_eos": False, "return_tokens": True,
                "response_fields": ["tokens", "stop_type", "timings"]}
        if seed is not None:
            body["seed"] = int(seed)
        reply, prefill = self._generate([int(t) for t in ids], body)
        self._served = True
        timings = {"draft_n": 0, "draft_n_accepted": 0, **(reply.get("timings") or {}), "restart_ms": restart_s * 1e3}
        for key in ("prompt_n", "prompt_ms"):  # the whole prompt: both requests
            timings[key] = timings.get(key, 0) + prefill.get(key, 0)
        self.last_timings.clear()  # one dict, updated in place: runner()'s run.last_timings is this dict
        self.last_timings.update(timings)
        return [int(t) for t in reply.get("tokens") or []][:max_new_tokens]

    def stream(self, ids: list[int], max_new_tokens: int, *, timeout_s: float = REQUEST_TIMEOUT_S) -> dict:
        """One streamed greedy generation for prompt ``ids`` on ``/completion`` (sent whole, no prompt cache),
        timed on the client: ``token_ids`` (ending with the end-of-generation token when one came),
        ``ttft_s`` (from sending to the first chunk with a token), ``total_s`` (to the last chunk),
        ``stop_type`` and the server's ``timings``. Keeps no state, so threads may call it concurrently (one
        request each; the server decodes up to ``parallel`` of them together)."""
        if self.proc is None:
            raise SpecframeError("this llama-server peer is closed")
        body = {"prompt": [int(t) for t in ids], "n_predict": int(max_new_tokens), "stream": True,
                "temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0,
                "samplers": SAMPLERS, "ignore_eos": False, "return_tokens": True, "cache_prompt": False}
        request = urllib.request.Request(self._url("/completion"), data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        tokens: list[int] = []
        first = None
        last: dict = {}
        start = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as reply:
                for line in reply:
                    if not line.startswith(b"data: "):
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise SpecframeError(f"llama-server: {chunk['error']}")
                    new = chunk.get("tokens") or []
                    if new and first is None:
                        first = time.perf_counter()
                    tokens += [int(t) for t in new]
                    if chunk.get("stop"):
                        last = chunk
                        break
        except urllib.error.HTTPError as err:
            raise SpecframeError(f"llama-server answered HTTP {err.code}: "
                                 f"{' '.join(err.read().decode('utf-8', 'replace').split())}") from None
        except (urllib.error.URLError, OSError) as err:
            raise SpecframeError(f"llama-server did not answer ({err}; log: {self.log_tail()})") from None
        end = time.perf_counter()
        return {"token_ids": tokens[:max_new_tokens], "ttft_s": (first or end) - start, "total_s": end - start,
                "stop_type": last.get("stop_type"), "timings": last.get("timings") or {}}

    def prepare(self) -> float:
        """Make the server fresh for the next request where speculation keeps state across requests (a
        restart); returns its seconds (0 when nothing was to do). ``specframe bench`` calls this before it
        starts the clock, so a restart is not counted as generation time; :meth:`run` calls it too."""
        if not (self.fresh_per_request and self._served):
            return 0.0
        start = time.perf_counter()
        self._stop()
        self._start()
        return time.perf_counter() - start

    def _generate(self, ids: list[int], body: dict) -> tuple[dict, dict]:
        """The generation reply and the prefill's timings. Like specframe's prefill, all but the last prompt
        token go first (a request that generates nothing and reuses no cache), then the whole prompt, reusing
        exactly that prefix: the last prompt token is decoded on its own. Sent in one request, the last
        prompt token would be a row of the prompt's batch, and its slightly different numbers change greedy
        choices at near-ties (measured: SmolLM2-135M, 4 of 5 prompts diverge from `ar` within 64 tokens)."""
        if len(ids) < 2:
            return self._post("/completion", {**body, "prompt": ids, "cache_prompt": False}), {}
        prefill = self._post("/completion", {**body, "prompt": ids[:-1], "n_predict": 0, "cache_prompt": False})
        return self._post("/completion", {**body, "prompt": ids, "cache_prompt": True}), prefill.get("timings") or {}

    def runner(self):
        """``run(ids, max_new_tokens, temperature, top_k, top_p, seed)`` for ``specframe bench``, with
        ``run.last_timings`` (the last response's ``timings``), ``run.prepare`` (a fresh server, before the
        clock starts) and ``run.close`` (stops the server)."""

        def run(ids, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, seed=None):
            return self.run(ids, max_new_tokens, temperature, top_k, top_p, seed)

        run.last_timings, run.close, run.peer, run.prepare = self.last_timings, self.close, self, self.prepare
        if self.draft_model is not None:  # bench notes what a draft-model peer drafts with
            run.description = self.description()
        return run
