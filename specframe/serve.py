"""``specframe serve``: an OpenAI-compatible HTTP server with speculative decoding.

Built on FastAPI (routing, pydantic request models, server-sent events), uvicorn (the HTTP server) and
``prometheus_client`` (``/metrics``). ONE scheduler thread owns the :class:`~specframe.engine.SpecGenerator`
(its target, its policy's components and their learned calibration are shared by every request) and runs
continuous batching on it (:class:`Scheduler`, :mod:`specframe.batch`): up to ``max_batch`` requests advance
together, one target call verifying all their trees, with one speculation budget across them under BASTION;
the rest wait in order:

* ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream`` for server-sent events),
* ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text format; the speculative counters
  carry vLLM's names: ``vllm:spec_decode_num_drafts``, ``..._num_draft_tokens``, ``..._num_accepted_tokens``,
  ``..._num_accepted_tokens_per_pos``).

A bounded queue answers 503 with ``Retry-After`` when full; a client that disconnects leaves the batch at the
next step. ``/metrics`` adds ``specframe:batch_size`` (requests per step) to vLLM's queue and latency metrics. Bad input gets a 4xx with an OpenAI-shaped body ``{"error": {message, type, param, code}}``.
No request field is ignored in silence: every OpenAI field is implemented (``logprobs`` included, from the
target's own distribution), accepted as metadata that changes no output (:data:`ACCEPTED`), accepted at its
no-op value only (:data:`NO_OP`; another value is a 400 ``unsupported_field`` naming it), and anything
else is a 400 ``unknown_field``.

>>> app = create_app(SpecGenerator(target, "bastion"), model_name="my-model")   # doctest: +SKIP
>>> uvicorn.run(app, host="127.0.0.1", port=8000)                               # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.sse import EventSourceResponse, format_sse_event
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batch import DEFAULT_PREFILL_CHUNK, BatchGenerator, BatchRequest
from .components import StepRecord, TokenLogprob
from .engine import SpecGenerator
from .errors import SpecframeError

DEFAULT_MAX_TOKENS = 256  # when a request gives neither max_tokens nor max_completion_tokens
DEFAULT_MAX_QUEUE = 64
DEFAULT_MAX_BATCH = 8  # requests decoded together (create_app's and `specframe serve`'s default)
RETRY_AFTER_S = 1
_WAIT_S = 0.25  # how often a waiting non-streaming request checks whether its client is still there


# ---------------------------------------------------------------------- errors
class APIError(Exception):
    """An error answered as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def validation_error(err: RequestValidationError) -> APIError:
    """The first pydantic/JSON error of a request, as one line naming the field."""
    first = (err.errors() or [{}])[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type", "")
    message = str(first.get("msg", "invalid request"))
    if kind == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', message)}",
                        code="invalid_json")
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    if kind == "extra_forbidden":  # not an OpenAI field (nor one of ours): a typo is never ignored in silence
        path = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".")
        return APIError(400, f"unknown field '{path}': not an OpenAI API field this server knows (a typo?)",
                        param=path, code="unknown_field")
    if kind == "missing":
        return APIError(400, f"'{where}' is required", param=param, code="missing_field")
    return APIError(400, f"{where}: {message.removeprefix('Value error, ')}", param=param, code="invalid_value")


# ---------------------------------------------------------------------- request models
# What the server does with every field of the OpenAI chat-completions and (legacy) completions requests.
# A field is one of: implemented; accepted metadata that changes no output (ignored, listed in ACCEPTED);
# accepted only at its no-op value (NO_OP: anything else is a 400 "unsupported_field" naming it); or not an
# OpenAI field at all (a 400 "unknown_field": a typo such as ``max_token`` is never ignored in silence).
# ``null`` is the same as leaving a field out, as OpenAI reads it.
ACCEPTED = {  # harmless metadata and hints: accepted and ignored (no effect on the output)
    "user": "an end-user id (OpenAI uses it for abuse monitoring)",
    "safety_identifier": "an end-user id (OpenAI uses it for abuse monitoring)",
    "metadata": "key-value labels for stored completions (nothing is stored here)",
    "prompt_cache_key": "a prompt-caching hint",
    "prompt_cache_retention": "a prompt-caching hint",
    "prompt_cache_options": "a prompt-caching hint",
    "parallel_tool_calls": "meaningless without tools",
}


@dataclass(frozen=True)
class _NoOp:
    accepts: Callable[[Any], bool]  # True for a value that changes nothing
    shown: str  # the accepted value(s), as the error message names them
    why: str  # what the server lacks


_NEVER = lambda v: False  # noqa: E731 - a field with no no-op value (only null/absent is accepted)
NO_OP: dict[str, _NoOp] = {
    "frequency_penalty": _NoOp(lambda v: v == 0 and not isinstance(v, bool), "0", "no repetition penalties"),
    "presence_penalty": _NoOp(lambda v: v == 0 and not isinstance(v, bool), "0", "no repetition penalties"),
    "logit_bias": _NoOp(lambda v: v == {}, "{}", "no logit bias"),
    "response_format": _NoOp(lambda v: v == {"type": "text"}, '{"type": "text"}',
                             "no structured output (json_object, json_schema)"),
    "tools": _NoOp(lambda v: v == [], "[]", "no tool calling"),
    "tool_choice": _NoOp(lambda v: v == "none", '"none"', "no tool calling"),
    "functions": _NoOp(lambda v: v == [], "[]", "no function calling"),
    "function_call": _NoOp(lambda v: v == "none", '"none"', "no function calling"),
    "audio": _NoOp(_NEVER, "null", "text output only"),
    "modalities": _NoOp(lambda v: v == ["text"], '["text"]', "text output only"),
    "prediction": _NoOp(_NEVER, "null", "no predicted outputs"),
    "reasoning_effort": _NoOp(_NEVER, "null", "no reasoning control"),
    "verbosity": _NoOp(lambda v: v == "medium", '"medium"', "no verbosity control"),
    "web_search_options": _NoOp(_NEVER, "null", "no web search"),
    "moderation": _NoOp(_NEVER, "null", "no moderation"),
    "service_tier": _NoOp(lambda v: v in ("auto", "default"), '"auto" or "default"', "one service tier"),
    "store": _NoOp(lambda v: v is False, "false", "completions are not stored"),
    # legacy completions
    "echo": _NoOp(lambda v: v is False, "false", "no echo of the prompt"),
    "best_of": _NoOp(lambda v: v == 1 and not isinstance(v, bool), "1", "one sequence per request"),
    "suffix": _NoOp(lambda v: v == "", '""', "no insertion (suffix)"),
}

def unsupported(param: str, why: str, accepted: str | None = None) -> APIError:
    """The 400 for a field (or value) this server does not implement."""
    tail = f"; omit it, or send null or {accepted}" if accepted and accepted != "null" else "; omit it or send null"
    return APIError(400, f"'{param}' is not supported by this server ({why}){tail}", param, "unsupported_field")


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted: no obfuscation padding is ever added


class ContentPart(BaseModel):
    """A part of a message's content; only ``text`` parts are supported (the others are named in the 400)."""

    model_config = ConfigDict(extra="forbid")

    type: str
    text: str | None = None
    image_url: Any = None
    input_audio: Any = None
    file: Any = None
    refusal: Any = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: Any = None  # the rest: declared so that they get "not supported" (see check_messages), not "unknown"
    tool_calls: Any = None
    tool_call_id: Any = None
    function_call: Any = None
    refusal: Any = None
    audio: Any = None

    def as_template_dict(self) -> dict[str, str]:
        """``{role, content}`` for the chat template (content parts joined; developer → system)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text or "" for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


def check_messages(messages: list[ChatMessage]) -> None:
    """A 400 naming ``messages[i]....`` for what the server cannot honour (tools, non-text parts, names) or a
    message without content: OpenAI requires content except on an assistant message with tool calls, and
    tool calls are not supported here, so null content is a 400 for every role."""
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if m.role in ("tool", "function"):
            raise unsupported(f"{at}.role", f"a '{m.role}' message answers a tool call, and there is no tool calling")
        for name, why, noop in (("tool_calls", "no tool calling", []), ("tool_call_id", "no tool calling", None),
                                ("function_call", "no function calling", None), ("audio", "text only", None),
                                ("refusal", "no refusals", None),
                                ("name", "the chat template gets each message's role and content only", None)):
            value = getattr(m, name)
            if value is not None and value != noop:
                raise unsupported(f"{at}.{name}", why)
        if m.content is None:
            raise APIError(400, f"'{at}.content' is null: a {m.role} message needs content (a string or a list of "
                                "text parts)", f"{at}.content", "invalid_value")
        for j, part in enumerate(m.content if isinstance(m.content, list) else []):
            where = f"{at}.content[{j}]"
            if part.type != "text":
                raise unsupported(f"{where}.type", f"content parts of type '{part.type}': text parts only", '"text"')
            if part.text is None:
                raise APIError(400, f"'{where}.text' is required in a text part", f"{where}.text", "missing_field")
            extra = [k for k in ("image_url", "input_audio", "file", "refusal") if getattr(part, k) is not None]
            if extra:
                raise APIError(400, f"unknown field '{where}.{extra[0]}' in a text part", f"{where}.{extra[0]}",
                               "unknown_field")


class _Sampling(BaseModel):
    """The fields both endpoints share, as the OpenAI API defines them (plus ``top_k``); see :data:`NO_OP`
    and :data:`ACCEPTED` for the rest of OpenAI's fields, and :meth:`check` for their values."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    max_tokens: int | None = Field(default=None, gt=0)
    temperature: float = Field(default=1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0, description="extension: 0 disables it")
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    # accepted and ignored (ACCEPTED), or accepted at their no-op value only (NO_OP)
    user: str | None = None
    frequency_penalty: Any = None
    presence_penalty: Any = None
    logit_bias: Any = None

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data):
        """``null`` is the field's default, as OpenAI reads it (clients send ``"temperature": null``)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"only n=1 is supported (the engine generates one sequence per request), got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    def check(self) -> None:
        """A 400 ``unsupported_field`` for the first field set to a value the server does not implement."""
        for name in sorted(self.model_fields_set & NO_OP.keys()):
            rule, value = NO_OP[name], getattr(self, name)
            if value is not None and not rule.accepts(value):
                raise unsupported(name, rule.why, rule.shown)

    def logprob_count(self) -> int | None:
        """How many alternatives per token the engine should return (None: no logprobs)."""
        return None

    def token_limit(self) -> tuple[int | None, str]:
        """(the limit the client set, or None; the field it came from)."""
        return (self.max_tokens if "max_tokens" in self.model_fields_set else None), "max_tokens"


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    # metadata (ACCEPTED)
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: Any = None
    prompt_cache_options: Any = None
    parallel_tool_calls: bool | None = None
    # not implemented: their no-op values only (NO_OP)
    response_format: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    prediction: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None
    moderation: Any = None
    service_tier: Any = None
    store: Any = None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "'top_logprobs' requires 'logprobs': true", "top_logprobs", "invalid_value")
        check_messages(self.messages)

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def token_limit(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, gt=0)  # the OpenAI default for completions
    logprobs: StrictInt | None = Field(default=None, ge=0, le=5)
    # not implemented: their no-op values only (NO_OP)
    echo: Any = None
    best_of: Any = None
    suffix: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise ValueError(f"only one prompt per request is supported, got {len(prompt)}")
            return prompt[0]
        return prompt

    def logprob_count(self) -> int | None:
        return self.logprobs


# ---------------------------------------------------------------------- incremental text
class TextStream:
    """Turns committed token ids into text deltas that never split a character or run into a stop string.

    Decodes the whole id list each time and releases only the part that is final: a trailing U+FFFD (an
    incomplete multi-byte character) and any tail that could still become a stop string are held back.
    Once a stop string appears the text is cut before it, exactly where plain decoding + that stop would
    cut it, and :attr:`stopped` turns true.

    With per-token ``entries`` (the engine's log-probs) it also releases each token's entry with the delta
    that completes the token's text (:meth:`step`, :meth:`end`): never one of a token past a stop cut, and
    in all exactly :attr:`token_count` of them, each paired with where its text starts in the completion
    (characters; a token inside a character starts where that character does)."""

    def __init__(self, decode: Callable[[list[int]], str], stops: list[str] | None = None):
        self.decode, self.stops = decode, list(stops or [])
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self.kept_tokens = 0  # with a stop: the fewest tokens whose text contains it
        self._finished = False
        self._entries: list | None = None  # per token, when given
        self._ends: list[int] = []  # per token: the length of the text through it (its entry waits for that much)
        self._starts: list[tuple[int, str]] = []  # per token: the text before it, less a trailing U+FFFD run (its
        # length, and that run: the run is text before it too where the final text has U+FFFD there as well)
        self.released: list[tuple[Any, int]] = []  # (entry, text offset) of every token released so far

    def push(self, new_ids: list[int], entries: list | None = None) -> str:
        """Add one step's tokens (and, optionally, one entry per token); return the text now safe to send."""
        before = len(self.ids)
        self.ids += new_ids
        text = self.decode(self.ids)
        if entries is not None:
            if len(entries) != len(new_ids):
                raise ValueError(f"{len(entries)} entries for {len(new_ids)} tokens")
            if self._entries is None:
                self._entries = [None] * before
                self._ends, self._starts = [0] * before, [(0, "")] * before
            previous = self.decode(self.ids[:before]) if before else ""
            for k in range(before + 1, len(self.ids) + 1):
                upto = text if k == len(self.ids) else self.decode(self.ids[:k])
                stable = len(previous.rstrip("\ufffd"))
                self._starts.append((stable, previous[stable:]))
                self._ends.append(len(upto))
                previous = upto
            self._entries += entries
        if self._stop_at(text) is not None:  # cut where plain decoding would: at the first token completing a stop
            self.stopped = True
            self.kept_tokens = self._tokens_until_stop(before)
            upto = self.decode(self.ids[: self.kept_tokens])
            return self._release(upto[: self._stop_at(upto)])
        return self._release(self._hold_back(text.rstrip("\ufffd")))

    def finish(self) -> str:
        """The rest of the text after the last step."""
        self._finished = True
        if self.stopped:
            return ""
        return self._release(self.decode(self.ids))

    def step(self, new_ids: list[int], entries: list | None = None) -> tuple[str, list[tuple[Any, int]]]:
        """:meth:`push`, and the ``(entry, text offset)`` of the tokens whose text is now all sent."""
        return self.push(new_ids, entries), self.take_entries()

    def end(self) -> tuple[str, list[tuple[Any, int]]]:
        """:meth:`finish`, and the entries of every kept token not yet released."""
        return self.finish(), self.take_entries()

    def take_entries(self) -> list[tuple[Any, int]]:
        """The ``(entry, text offset)`` pairs released since the last call (none without entries)."""
        if self._entries is None:
            return []
        done = len(self.released)
        if self.stopped:
            upto = self.kept_tokens
        elif self._finished:
            upto = len(self._entries)
        else:
            upto = done
            while upto < len(self._entries) and self._ends[upto] <= len(self.sent):
                upto += 1
        out = [(self._entries[i], self._offset(i)) for i in range(done, upto)]
        self.released += out
        return out

    def _offset(self, i: int) -> int:
        """Where token ``i``'s text starts in the text sent (a token completing a character: where it starts)."""
        stable, run = self._starts[i]
        n = 0
        while n < len(run) and self.sent[stable + n: stable + n + 1] == run[n]:
            n += 1  # an invalid byte sequence stays U+FFFD in the final text: it is before this token
        return min(stable + n, len(self.sent))

    @property
    def text(self) -> str:
        return self.sent

    @property
    def token_count(self) -> int:
        return self.kept_tokens if self.stopped else len(self.ids)

    def _release(self, stable: str) -> str:
        if not stable.startswith(self.sent):  # a decoder that rewrote earlier text: wait for the end
            return ""
        delta, self.sent = stable[len(self.sent):], stable
        return delta

    def _stop_at(self, text: str) -> int | None:
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        return min(found) if found else None

    def _hold_back(self, text: str) -> str:
        """``text`` without its longest tail that is a proper prefix of a stop string."""
        hold = 0
        for stop in self.stops:
            for n in range(min(len(stop) - 1, len(text)), hold, -1):
                if text.endswith(stop[:n]):
                    hold = n
                    break
        return text[: len(text) - hold] if hold else text

    def _tokens_until_stop(self, start: int) -> int:
        for k in range(max(start, 1), len(self.ids) + 1):
            if self._stop_at(self.decode(self.ids[:k])) is not None:
                return k
        return len(self.ids)


# ---------------------------------------------------------------------- log-probs: token text and the two shapes
_MIN_LOGPROB = -9999.0  # what OpenAI reports for a token of probability (about) 0; JSON has no -inf


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level BPE alphabet: byte → the character that stands for it in the vocabulary."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(keep, map(chr, chars)))


class TokenName(NamedTuple):
    """One token as logprobs show it: its text (its bytes as UTF-8, U+FFFD for part of a character; a special
    token's own text), its bytes, and whether those bytes are the token's real ones."""

    text: str
    raw: bytes
    exact: bool

    @property
    def legacy(self) -> str:
        """The text completions' name: the text, or ``bytes:\\xe6\\x97`` for part of a character (as OpenAI
        writes it, so that no two tokens share a key in ``top_logprobs``)."""
        try:
            return self.raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in self.raw)


class TokenText:
    """The text and bytes of single tokens of a target, for logprobs (cached per id).

    The bytes are the token's own wherever the backend tells them: llama.cpp's piece of the token; a Hugging
    Face tokenizer's vocabulary entry read through its byte-level alphabet (GPT-2 style BPE), its ``<0xNN>``
    byte-fallback tokens or its ``▁`` word marks (SentencePiece style), an added token's content. Otherwise
    they are the UTF-8 of the token decoded alone (``exact`` False), which is only approximate for a token
    that holds part of a character."""

    def __init__(self, target):
        self.target = target
        self._cache: dict[int, TokenName] = {}
        self._setup = False

    def __call__(self, token: int) -> TokenName:
        name = self._cache.get(token)
        if name is None:
            raw, exact = self._raw(int(token))
            name = self._cache[token] = TokenName(raw.decode("utf-8", "replace"), raw, exact)
        return name

    def _prepare(self) -> None:
        self._setup = True
        tok = getattr(self.target, "tokenizer", None)
        self._tok = tok if callable(getattr(tok, "convert_ids_to_tokens", None)) else None
        self._added: dict[int, str] = {}
        self._byte_of: dict[str, int] | None = None
        self._metaspace = False
        if self._tok is None:
            return
        try:
            self._added = {int(i): str(getattr(t, "content", t)) for i, t in (tok.added_tokens_decoder or {}).items()}
        except Exception:  # noqa: BLE001 - a tokenizer without the attribute: no added tokens known
            self._added = {}
        try:
            decoder = tok.backend_tokenizer.decoder
            spec = decoder.__getstate__().decode("utf-8", "replace") if decoder is not None else ""
        except Exception:  # noqa: BLE001 - a slow tokenizer: no decoder to read
            spec = ""
        if '"ByteLevel"' in spec:
            self._byte_of = {c: b for b, c in _bytes_to_unicode().items()}
        self._metaspace = '"Metaspace"' in spec or "\u2581" in spec

    def _raw(self, token: int) -> tuple[bytes, bool]:
        piece = getattr(self.target, "_piece", None)
        if callable(piece):  # llama.cpp: the token's own bytes (a control token: its text)
            return piece(token, False) or piece(token, True), True
        if not self._setup:
            self._prepare()
        if self._tok is not None:
            if token in self._added:
                return self._added[token].encode("utf-8"), True
            entry = self._tok.convert_ids_to_tokens(token)
            if isinstance(entry, str):
                if len(entry) == 6 and entry.startswith("<0x") and entry.endswith(">"):
                    try:
                        return bytes([int(entry[3:5], 16)]), True
                    except ValueError:
                        pass
                if self._byte_of is not None and all(c in self._byte_of for c in entry):
                    return bytes(self._byte_of[c] for c in entry), True
                if self._metaspace:
                    return entry.replace("\u2581", " ").encode("utf-8"), True
        text = self.target.decode([token])
        if not text:  # a special token, which decoding skips: its own text
            try:
                text = self.target.decode([token], skip_special_tokens=False)
            except TypeError:
                pass
        return text.encode("utf-8"), False


def chat_logprobs(entries: list[tuple[TokenLogprob, int]], names: TokenText, top: int) -> dict:
    """``choices[i].logprobs`` of a chat completion (or of one chunk) for these tokens."""

    def one(token: int, logprob: float) -> dict:
        name = names(token)
        return {"token": name.text, "logprob": max(logprob, _MIN_LOGPROB), "bytes": list(name.raw)}

    content = [{**one(lp.token, lp.logprob), "top_logprobs": [one(t, v) for t, v in lp.top[:top]]}
               for lp, _ in entries]
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list[tuple[TokenLogprob, int]], names: TokenText, top: int) -> dict:
    """``choices[i].logprobs`` of a text completion (or of one chunk), OpenAI's legacy shape: per token its
    name, log-prob, the ``top`` likeliest tokens plus the chosen one (so up to top + 1, best first) and
    where its text starts in the completion."""
    tokens, values, tops, offsets = [], [], [], []
    for lp, offset in entries:
        tokens.append(names(lp.token).legacy)
        values.append(max(lp.logprob, _MIN_LOGPROB))
        best = list(lp.top[:top])
        if all(t != lp.token for t, _ in best):
            best = sorted([*best, (lp.token, lp.logprob)], key=lambda tv: -tv[1])
        alternatives: dict[str, float] = {}
        for t, v in best:
            alternatives.setdefault(names(t).legacy, max(v, _MIN_LOGPROB))
        tops.append(alternatives)
        offsets.append(offset)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


# ---------------------------------------------------------------------- metrics
class Metrics:
    """The server's Prometheus metrics, in a registry of their own (one per app)."""

    def __init__(self, model: str):
        self.registry = reg = CollectorRegistry()
        self.model = model
        labels = ["model_name"]
        self.http = Counter("specframe:http_requests", "HTTP requests answered, by route and status.",
                            ["route", "status"], registry=reg)
        self.success = Counter("vllm:request_success", "Finished requests, by finish reason (stop, length, abort).",
                               labels + ["finished_reason"], registry=reg)
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens processed.", labels, registry=reg)
        self.generation_tokens = Counter("vllm:generation_tokens", "Tokens generated (as returned to clients).",
                                         labels, registry=reg)
        self.waiting = Gauge("vllm:num_requests_waiting", "Requests waiting in the queue.", labels, registry=reg)
        self.running = Gauge("vllm:num_requests_running", "Requests in the batch (being prefilled or generated).",
                             labels, registry=reg)
        self.batch_size = Histogram("specframe:batch_size", "Requests verified together, per target step.", labels,
                                    registry=reg, buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64))
        self.drafts = Counter("vllm:spec_decode_num_drafts", "Steps that verified a draft (a tree beyond its root).",
                              labels, registry=reg)
        self.draft_tokens = Counter("vllm:spec_decode_num_draft_tokens", "Draft tokens verified (tree nodes beyond "
                                    "the root).", labels, registry=reg)
        self.accepted_tokens = Counter("vllm:spec_decode_num_accepted_tokens", "Draft tokens accepted.", labels,
                                       registry=reg)
        self.accepted_per_pos = Counter("vllm:spec_decode_num_accepted_tokens_per_pos",
                                        "Accepted draft tokens per position (depth - 1).", labels + ["position"],
                                        registry=reg)
        self.steps = Counter("specframe:steps", "Target forwards (decoding steps), drafted or not.", labels, registry=reg)
        self.tau = Gauge("specframe:mean_acceptance_length", "Tokens per target forward incl. the bonus token (tau), "
                         "over every step so far.", labels, registry=reg)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time from arrival to the first token.", labels,
                              registry=reg, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "Time from arrival to the last token.", labels,
                             registry=reg, buckets=(0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300))
        self.queue_time = Histogram("vllm:request_queue_time_seconds", "Time spent waiting in the queue.", labels,
                                    registry=reg, buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self._steps = self._accepted = 0

    def observe_steps(self, records: list[StepRecord]) -> None:
        m = self.model
        for r in records:
            self.steps.labels(m).inc()
            if r.tree_size > 1:
                self.drafts.labels(m).inc()
                self.draft_tokens.labels(m).inc(r.tree_size - 1)
                self.accepted_tokens.labels(m).inc(r.accepted)
                for pos in range(r.accepted):
                    self.accepted_per_pos.labels(m, str(pos)).inc()
            self._steps += 1
            self._accepted += r.accepted
        if self._steps:
            self.tau.labels(m).set((self._steps + self._accepted) / self._steps)

    def observe_batch(self, size: int) -> None:
        """One step of the batch, with ``size`` requests in it."""
        self.batch_size.labels(self.model).observe(size)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


# ---------------------------------------------------------------------- the worker
@dataclass
class Job:
    """One request for the worker. ``emit`` is called from the worker thread with each event:
    ``("delta", text, entries)``, then ``("done", Result)`` or ``("error", APIError)``. ``entries`` is None
    unless the job asks for ``logprobs`` (alternatives per token); then it is the ``(TokenLogprob, text
    offset)`` of the tokens whose text this delta completes (:meth:`TextStream.step`)."""

    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stops: list[str]
    emit: Callable[[tuple], None]
    arrived: float = field(default_factory=time.perf_counter)
    cancelled: threading.Event = field(default_factory=threading.Event)
    logprobs: int | None = None  # None: no log-probs; k: each token's and its k likeliest alternatives


@dataclass
class Result:
    text: str
    token_ids: list[int]
    finish_reason: str
    prompt_tokens: int
    records: list[StepRecord]
    seconds: float  # from the job's start to its end (queue time excluded)
    ttft_s: float | None  # from arrival to the first token
    logprobs: list[tuple[TokenLogprob, int]] | None = None  # per kept token (with its text offset), when asked

    def usage(self) -> dict:
        n = len(self.token_ids)
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": n, "total_tokens": self.prompt_tokens + n}

    def stats(self) -> dict:
        """The ``specframe`` field: τ, steps, mean tree size and speed of this request."""
        steps = len(self.records)
        return {
            "tau": round(sum(r.accepted + 1 for r in self.records) / steps, 4) if steps else 0.0,
            "steps": steps,
            "mean_tree_size": round(sum(r.tree_size for r in self.records) / steps, 3) if steps else 0.0,
            "tokens_per_s": round(len(self.token_ids) / self.seconds, 3) if self.seconds > 0 else 0.0,
            "seconds": round(self.seconds, 4),
            "time_to_first_token_s": None if self.ttft_s is None else round(self.ttft_s, 4),
            "token_ids": self.token_ids,
        }


class Scheduler:
    """The one thread that owns the generator and runs continuous batching on it
    (:class:`~specframe.batch.BatchGenerator`): every request in the batch advances in every step, a new one
    joins at the next step (its prompt prefilled in chunks), a finished one leaves, and one whose client went
    away leaves at the next step. Up to ``max_batch`` requests run at once; the others wait in a bounded FIFO
    queue (full: 503). ``max_batch=1`` is the one-at-a-time server.

    ``before_step`` (tests) is called on the scheduler's thread before every step, with the number of
    requests in the batch: a test holds the scheduler there to force an interleaving (no sleeps)."""

    def __init__(self, generator: SpecGenerator, metrics: Metrics, max_queue: int = DEFAULT_MAX_QUEUE,
                 max_batch: int = 1, before_step: Callable[[int], None] | None = None,
                 prefill_chunk: int = DEFAULT_PREFILL_CHUNK):
        if max_queue <= 0:
            raise SpecframeError(f"--max-queue must be positive, got {max_queue}")
        self.gen, self.metrics, self.before_step = generator, metrics, before_step
        self.batch = BatchGenerator(generator, max_batch, prefill_chunk)
        self.queue: queue.Queue[Job | None] = queue.Queue(maxsize=max_queue)
        self.next: Job | None = None  # the queue's head when it waits for room in the batch
        self.live: dict[int, _Live] = {}
        self.stopping = False
        name = metrics.model
        metrics.waiting.labels(name).set_function(lambda: self.queue.qsize() + (self.next is not None))
        metrics.running.labels(name).set_function(lambda: self.batch.size)
        self.thread = threading.Thread(target=self._loop, name="specframe-serve-scheduler", daemon=True)
        self.thread.start()

    @property
    def busy(self) -> bool:
        return self.batch.busy

    def submit(self, job: Job) -> None:
        """Queue a job; a full queue is a 503 with ``Retry-After``."""
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise APIError(503, f"the server is busy: {self.queue.maxsize} requests are already waiting; retry later",
                           code="queue_full", kind="server_busy", headers={"Retry-After": str(RETRY_AFTER_S)}) from None

    def stop(self) -> None:
        self.queue.put(None)

    def _loop(self) -> None:
        while not self.stopping:
            if not self.batch.busy and self.next is None:  # idle: wait for a request
                job = self.queue.get()
                if job is None:
                    break
                self.next = job
            self._admit()
            if not self.batch.busy:
                continue
            if self.before_step is not None:
                self.before_step(self.batch.size)
            try:
                for req in self.batch.step():
                    self._finish(self.live[id(req)], req)
                    del self.live[id(req)]
            except Exception as err:  # noqa: BLE001 - the scheduler must survive anything: fail this batch, go on
                self._fail_all(err)
            self.metrics.observe_batch(len(self.batch.active) or 1)

    def _fail_all(self, err: Exception) -> None:
        """Every request in the batch ends with a 500 naming ``err``; the scheduler goes on with the queue."""
        for member in self.batch.joining + self.batch.active:
            member.req.cancel()
        self.batch.step()  # each leaves (its session and drafter freed)
        for live in self.live.values():
            live.job.emit(("error", APIError(500, f"generation failed: {type(err).__name__}: {err}",
                                             kind="server_error", code="internal_error")))
        self.live.clear()

    def _admit(self) -> None:
        """Waiting requests join the batch, in order, while it has room for the next one."""
        while True:
            if self.next is None:
                try:
                    self.next = self.queue.get_nowait()
                except queue.Empty:
                    return
                if self.next is None:  # stop() was called
                    self.stopping = True
                    return
            job = self.next
            if job.cancelled.is_set():  # the client left while it waited
                self.next = None
                self.metrics.success.labels(self.metrics.model, "abort").inc()
                continue
            live = _Live(job, TextStream(self.gen.target.decode, job.stops))
            req = BatchRequest(job.prompt_ids, job.max_tokens, job.temperature, job.top_k, job.top_p, job.seed,
                               job.logprobs, live.on_step, _cancel=job.cancelled)
            if not self.batch.has_room(req):
                if self.batch.busy:
                    return  # it waits for a request to leave
                self.next = None  # alone it would still not fit: it never will
                job.emit(("error", APIError(400, f"a request of {len(job.prompt_ids)} prompt + {job.max_tokens} new "
                                            "tokens does not fit the target's cache beside a draft tree; lower "
                                            "max_tokens or raise the context (--backend-option n_ctx=N)",
                                            "max_tokens", "context_length_exceeded")))
                continue
            self.next = None
            try:
                self.batch.submit(req)
            except SpecframeError as err:
                job.emit(("error", APIError(400, str(err), code="generation_failed")))
                continue
            except Exception as err:  # noqa: BLE001 - the scheduler must survive anything; the client gets one line
                job.emit(("error", APIError(500, f"could not start the request: {type(err).__name__}: {err}",
                                            kind="server_error", code="internal_error")))
                continue
            live.started = time.perf_counter()
            self.metrics.queue_time.labels(self.metrics.model).observe(live.started - job.arrived)
            self.live[id(req)] = live

    def _finish(self, live: "_Live", req: BatchRequest) -> None:
        """A request left the batch: its last text, its result (or error) and the metrics."""
        m, name, job, text = self.metrics, self.metrics.model, live.job, live.text
        m.observe_steps(req.stats.records)
        if req.finish_reason == "error":
            err = req.error
            if isinstance(err, SpecframeError):
                job.emit(("error", APIError(400, str(err), code="generation_failed")))
            else:
                job.emit(("error", APIError(500, f"generation failed: {type(err).__name__}: {err}",
                                            kind="server_error", code="internal_error")))
            return
        if req.finish_reason == "cancelled" or job.cancelled.is_set():
            m.success.labels(name, "abort").inc()
            m.generation_tokens.labels(name).inc(text.token_count)
            return
        emit_delta(job, *text.end())
        ended = time.perf_counter()
        reason = "length" if req.finish_reason == "length" and not text.stopped else "stop"
        result = Result(text.text, text.ids[: text.token_count], reason, len(job.prompt_ids), req.stats.records,
                        ended - live.started, None if live.first is None else live.first - job.arrived,
                        None if job.logprobs is None else list(text.released))
        m.success.labels(name, reason).inc()
        m.prompt_tokens.labels(name).inc(result.prompt_tokens)
        m.generation_tokens.labels(name).inc(len(result.token_ids))
        if result.ttft_s is not None:
            m.ttft.labels(name).observe(result.ttft_s)
        m.e2e.labels(name).observe(ended - job.arrived)
        job.emit(("done", result))


@dataclass
class _Live:
    """A job in the batch: its text stream and when it started and first produced a token."""

    job: Job
    text: TextStream
    started: float = 0.0
    first: float | None = None

    def on_step(self, ids: list[int], step_logprobs: list[TokenLogprob]) -> bool:
        """Stream a step's text; True (stop) for a stop string or a client that went away."""
        job = self.job
        if job.cancelled.is_set():
            return True
        if self.first is None:
            self.first = time.perf_counter()
        emit_delta(job, *self.text.step(ids, step_logprobs if job.logprobs is not None else None))
        return self.text.stopped


def emit_delta(job: Job, delta: str, entries: list) -> None:
    """Send a job the ``("delta", text, entries)`` event of a step (or of the end), if it has anything."""
    if delta or entries:
        job.emit(("delta", delta, None if job.logprobs is None else entries))


# ---------------------------------------------------------------------- the app
def create_app(generator: SpecGenerator, *, model_name: str | None = None, max_queue: int = DEFAULT_MAX_QUEUE,
               api_key: str | None = None, default_max_tokens: int = DEFAULT_MAX_TOKENS,
               max_batch: int = DEFAULT_MAX_BATCH, before_step: Callable[[int], None] | None = None,
               prefill_chunk: int = DEFAULT_PREFILL_CHUNK) -> FastAPI:
    """An OpenAI-compatible FastAPI app around a built generator (served as ``model_name``), batching up to
    ``max_batch`` requests at once (``before_step``: see :class:`Scheduler`)."""
    name = model_name or generator.target.name
    metrics = Metrics(name)
    worker = Scheduler(generator, metrics, max_queue, max_batch, before_step, prefill_chunk)
    app = FastAPI(title="specframe", description="OpenAI-compatible speculative decoding server")
    app.state.worker, app.state.metrics, app.state.model_name = worker, metrics, name
    token_names = TokenText(generator.target)  # for logprobs
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError):
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError):
        return validation_error(err).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code)
        return APIError(err.status_code, str(err.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, err: Exception):
        return APIError(500, f"internal error: {type(err).__name__}: {err}", kind="server_error",
                        code="internal_error").response()

    app.add_middleware(_Guard, api_key=api_key, metrics=metrics)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": name, "policy": generator.policy_name, "max_batch": worker.batch.capacity,
                "batch": worker.batch.describe()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "specframe"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model, name)
        body.check()
        if not generator.target.has_chat_template:
            raise APIError(400, f"model '{name}' has no chat template; send a prompt to /v1/completions", "messages",
                           "no_chat_template")
        try:
            ids = generator.target.encode_messages([m.as_template_dict() for m in body.messages])
        except Exception as err:  # noqa: BLE001 - a template that rejects these messages
            raise APIError(400, f"the chat template rejected these messages: {err}", "messages", "invalid_messages") from err
        return await respond(request, body, ids, "messages", chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model, name)
        body.check()
        if isinstance(body.prompt, str):
            ids = generator.target.encode(body.prompt, chat=False)
        else:
            ids = list(body.prompt)
            bad = [t for t in ids if not 0 <= t < generator.target.vocab_size]
            if bad:
                raise APIError(400, f"prompt token {bad[0]} is outside the vocabulary [0, {generator.target.vocab_size})",
                               "prompt", "invalid_value")
        return await respond(request, body, ids, "prompt", chat=False)

    async def respond(request: Request, body: _Sampling, ids: list[int], prompt_field: str, chat: bool):
        job, events = make_job(body, ids, prompt_field)
        worker.submit(job)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        shape = _Shape(ident, name, int(time.time()), chat, body.logprob_count(), token_names)
        if body.stream:
            usage = bool(body.stream_options and body.stream_options.include_usage)
            return EventSourceResponse(stream_events(job, events, shape, usage), headers={"Cache-Control": "no-cache"})
        return await complete(request, job, events, shape)

    def make_job(body: _Sampling, ids: list[int], prompt_field: str) -> tuple[Job, asyncio.Queue]:
        if not ids:
            raise APIError(400, f"'{prompt_field}' is empty", prompt_field, "invalid_value")
        context = generator.target.max_context
        room = context - len(ids)
        limit, field_name = body.token_limit()
        default = body.max_tokens or default_max_tokens  # completions default to 16 tokens, as OpenAI's do
        if room <= 0:
            raise APIError(400, f"'{prompt_field}' is {len(ids)} tokens, but this model's context is {context} tokens",
                           prompt_field, "context_length_exceeded")
        if limit is not None and limit > room:
            raise APIError(400, f"{field_name} ({limit}) + the prompt ({len(ids)} tokens) exceeds this model's context "
                                f"of {context} tokens", field_name, "context_length_exceeded")
        loop, events = asyncio.get_running_loop(), asyncio.Queue()

        def emit(event: tuple) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, event)
            except RuntimeError:  # the event loop is gone (shutting down)
                job.cancelled.set()

        job = Job(ids, limit or min(default, room), body.temperature, body.top_p, body.top_k, body.seed,
                  list(body.stop or []), emit, logprobs=body.logprob_count())
        return job, events

    async def complete(request: Request, job: Job, events: asyncio.Queue, shape: "_Shape"):
        while True:
            try:
                kind, value, *_ = await asyncio.wait_for(events.get(), _WAIT_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    job.cancelled.set()
                    return PlainTextResponse("", status_code=499)
                continue
            if kind == "error":
                raise value
            if kind == "done":  # deltas are for streams; the result holds the whole text
                return shape.full(value)

    async def stream_events(job: Job, events: asyncio.Queue, shape: "_Shape", include_usage: bool):
        try:
            if shape.chat:  # the assistant's role comes first, as OpenAI streams it
                yield _sse(shape.chunk("", role=True, usage=include_usage))
            while True:
                kind, value, *rest = await events.get()
                if kind == "delta":  # ("delta", text, entries): entries None unless logprobs were asked for
                    yield _sse(shape.chunk(value, usage=include_usage, entries=rest[0] if rest else None))
                elif kind == "error":
                    yield _sse(value.body())
                    break
                else:
                    yield _sse(shape.chunk("", finish=value, usage=include_usage))
                    if include_usage:
                        yield _sse(shape.usage_chunk(value))
                    break
            yield format_sse_event(data_str="[DONE]")
        finally:  # done, or the client went away (the task is cancelled): stop at the next step
            job.cancelled.set()

    return app


_ROUTES = {"/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions"}


class _Guard:
    """ASGI middleware: counts every answer by route and status; with an API key, answers 401 on /v1/
    unless the request sends ``Authorization: Bearer KEY``. (Pure ASGI, so streaming and disconnects pass
    through untouched.)"""

    def __init__(self, app, api_key: str | None, metrics: Metrics):
        self.app, self.api_key, self.metrics = app, api_key, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in _ROUTES else "other"

        async def counted(message):
            if message["type"] == "http.response.start":
                self.metrics.http.labels(route, str(message["status"])).inc()
            await send(message)

        if self.api_key is not None and scope["path"].startswith("/v1/") and not self._authorized(scope):
            refusal = APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'",
                               code="invalid_api_key")
            return await refusal.response()(scope, receive, counted)
        await self.app(scope, receive, counted)

    def _authorized(self, scope) -> bool:
        scheme, _, token = Headers(scope=scope).get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode())


def check_model(requested: str | None, served: str) -> None:
    """A request may omit ``model``; a name other than the served one is a 404 (as OpenAI answers)."""
    if requested is not None and requested != served:
        raise APIError(404, f"the model '{requested}' does not exist; this server serves '{served}'", "model",
                       "model_not_found")


def _sse(payload: dict) -> bytes:
    return format_sse_event(data_str=json.dumps(payload, ensure_ascii=False))


@dataclass
class _Shape:
    """Builds the OpenAI response objects of one request (chat or text completion)."""

    ident: str
    model: str
    created: int
    chat: bool
    logprobs: int | None = None  # None: not asked for; k: alternatives per token
    names: TokenText | None = None

    def _logprobs(self, entries: list | None) -> dict | None:
        if self.logprobs is None or entries is None or self.names is None:
            return None
        shape = chat_logprobs if self.chat else completion_logprobs
        return shape(entries, self.names, self.logprobs)

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.ident, "object": obj, "created": self.created, "model": self.model}

    def full(self, result: Result) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result.text},
                      "logprobs": self._logprobs(result.logprobs), "finish_reason": result.finish_reason}
        else:
            choice = {"index": 0, "text": result.text, "logprobs": self._logprobs(result.logprobs),
                      "finish_reason": result.finish_reason}
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [choice], "usage": result.usage(), "specframe": result.stats()}

    def chunk(self, text: str, *, role: bool = False, finish: Result | None = None, usage: bool = False,
              entries: list | None = None) -> dict:
        """One streamed chunk; ``entries``: the log-probs of the tokens whose text it carries (when asked)."""
        reason = None if finish is None else finish.finish_reason
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant", "content": text} if role else ({"content": text} if text or
                                                                                        finish is None else {})
            choice = {"index": 0, "delta": delta, "logprobs": self._logprobs(entries), "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": self._logprobs(entries), "finish_reason": reason}
        out = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}
        if usage:
            out["usage"] = None
        if finish is not None:
            out["specframe"] = finish.stats()
        return out

    def usage_chunk(self, result: Result) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": result.usage()}


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app with uvicorn until interrupted; the worker stops with it."""
    import uvicorn

    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
    finally:
        app.state.worker.stop()


def wait_until_ready(url: str, proc, seconds: float, log) -> None:
    """Poll ``url``/health until the server in subprocess ``proc`` answers 200 (for scripts and tests that
    start one); ``RuntimeError`` with the tail of its ``log`` file if it exits or takes over ``seconds``."""
    import httpx

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server not ready after {seconds} s:\n{log.read_text()[-3000:]}")
