"""``specframe serve``: the real server (uvicorn in a subprocess on 127.0.0.1 and a free port) driven by
the official ``openai`` client and raw ``httpx``.

* A tiny random Llama with a real byte-level BPE tokenizer and a chat template is saved to a temporary
  directory and served with ``specframe serve --target DIR --policy bastion`` (fp64, so the tree forward
  and plain decoding agree exactly). Its output layer favours a few tokens, among them the single bytes of
  multi-byte characters, so streams really do split characters across steps.
* The batching cases (requests joining and leaving, a disconnect, a full queue, the API key) run on a uvicorn
  server in this process whose scheduler the test holds between steps: tests/test_serve_batch.py.
* A slow test serves the embedded SmolLM2 and checks greedy chat through HTTP against in-process decoding.

Every request loop is bounded.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from specframe import SpecGenerator, Target  # noqa: E402
from specframe.backends import load_target  # noqa: E402
from specframe.serve import TextStream, wait_until_ready  # noqa: E402

MODEL = "tiny"
FAVOURED = ["é", "日", "ü", "a", "s", "t", "o", "n", " ", "\n", " the", " river"]  # the output layer's favourites
CORPUS = ["The river runs to the sea.", "Name three rivers in Europe.", "café au lait, naïve résumé",
          "日本の川は美しい", "count one two three four five six seven eight nine ten"] * 4
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ---------------------------------------------------------------------- the tiny model on disk
def build_tiny_model(path: Path) -> Path:
    """Save a tiny random Llama (fp64) with a byte-level BPE tokenizer trained on a few strings."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = byte_level, decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    vocab = fast.get_vocab()
    pieces = list(byte_level.pre_tokenize_str("é日ü")[0][0])  # the single bytes of multi-byte characters
    pieces += [byte_level.pre_tokenize_str(p)[0][0] for p in FAVOURED]
    favoured = sorted({vocab[p] for p in pieces if p in vocab})
    config = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                      eos_token_id=fast.eos_token_id, bos_token_id=None, pad_token_id=None,
                                      initializer_range=0.2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).double().eval()
    with torch.no_grad():
        keep = torch.zeros(len(fast), dtype=torch.bool)
        keep[favoured] = True
        model.lm_head.weight[~keep] *= 0.3
        model.lm_head.weight[keep] *= 3
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def reference(tiny_dir):
    """In-process plain decoding (policy ar) of the same model, to compare the server against."""
    return SpecGenerator(Target.load(str(tiny_dir), dtype="float64"), "ar")


# ---------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess; ``url`` once /health answers."""

    def __init__(self, args: list[str], log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
        cmd = [a.replace("{port}", str(self.port)) for a in args]
        self.proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, seconds: float = 240) -> "Server":
        wait_until_ready(self.url, self.proc, seconds, self.log)
        return self

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=20)

    def client(self, api_key: str = "unused", **kwargs) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=120, **kwargs)

    def metrics(self) -> dict[str, float]:
        """``name{label=value,...}`` → value, plus bare ``name`` → the sum over its labels."""
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()) if k != "model_name")
                out[f"{sample.name}{{{labels}}}"] = sample.value
                out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out


CLI = [sys.executable, "-c", "from specframe.cli import main; main()", "--threads", "1"]

@pytest.fixture(scope="module")
def server(tiny_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve") / "server.log"
    srv = Server(CLI + ["serve", "--target", str(tiny_dir), "--dtype", "float64", "--policy", "bastion",
                        "--served-model-name", MODEL, "--port", "{port}", "--log-level", "warning"], log)
    try:
        yield srv.wait_ready()
    finally:
        srv.stop()


# ---------------------------------------------------------------------- helpers
def chat_ids(gen: SpecGenerator, text: str) -> list[int]:
    return gen.target.encode_messages([{"role": "user", "content": text}])


def plain_stop(gen: SpecGenerator, ids: list[int], stops: list[str]) -> tuple[str, int]:
    """What plain decoding + stop strings returns: the first token count whose text holds a stop, the
    text cut before the stop."""
    for k in range(1, len(ids) + 1):
        text = gen.target.decode(ids[:k])
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            return text[: min(found)], k
    return gen.target.decode(ids), len(ids)


def stream_text(stream, chat: bool) -> tuple[str, list]:
    chunks = list(stream)
    if chat:
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    else:
        text = "".join(c.choices[0].text for c in chunks if c.choices)
    return text, chunks


# ---------------------------------------------------------------------- TextStream (in process)
def chars(ids: list[int]) -> str:
    return "".join(map(chr, ids))


def test_text_stream_holds_back_a_split_character(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    text = "aé日ü ü"
    ids = tok(text)["input_ids"]
    assert len(ids) > len(text) - 1  # some characters really are split into byte tokens
    stream = TextStream(lambda x: tok.decode(x))
    deltas = [stream.push([i]) for i in ids] + [stream.finish()]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == text == stream.text


def test_text_stream_cuts_at_the_stop_plain_decoding_would_see_first():
    stream = TextStream(chars, ["STOP"])
    assert [stream.push([ord(c) for c in part]) for part in ("ab", "cS", "TOPd")] == ["ab", "c", ""]
    assert stream.stopped and stream.text == "abc" and stream.token_count == 7
    # "c" completes before "abcd" does, so plain decoding stops at "c": "ab", 3 tokens
    stream = TextStream(chars, ["abcd", "c"])
    assert stream.push([ord(c) for c in "abcdef"]) == "ab" and stream.token_count == 3


# ---------------------------------------------------------------------- endpoints
def test_health_models_and_metrics_answer(server):
    assert httpx.get(f"{server.url}/health").json()["status"] == "ok"
    assert [m.id for m in server.client().models.list().data] == [MODEL]
    text = httpx.get(f"{server.url}/metrics").text
    for name in ("vllm:spec_decode_num_drafts", "vllm:spec_decode_num_draft_tokens", "vllm:spec_decode_num_accepted_tokens",
                 "vllm:num_requests_waiting", "vllm:num_requests_running", "specframe:mean_acceptance_length"):
        assert name in text


def test_chat_greedy_is_plain_decoding(server, reference):
    prompt = "Name three rivers in Europe."
    out = server.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": prompt}],
                                                   max_tokens=24, temperature=0)
    ref = reference.generate(chat_ids(reference, prompt), 24)
    assert out.choices[0].message.content == ref.text
    assert out.specframe["token_ids"] == ref.token_ids
    assert out.choices[0].finish_reason == "length"
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (len(ref.prompt_ids), 24)
    stats = out.specframe
    assert stats["steps"] >= 1 and stats["tau"] >= 1 and stats["mean_tree_size"] >= 1 and stats["tokens_per_s"] > 0


def test_completion_greedy_is_plain_decoding(server, reference):
    out = server.client().completions.create(model=MODEL, prompt="The river runs", max_tokens=20, temperature=0)
    ref = reference.generate(reference.target.encode("The river runs", chat=False), 20)
    assert out.choices[0].text == ref.text and out.specframe["token_ids"] == ref.token_ids
    ids = reference.target.encode("count one two", chat=False)
    out = server.client().completions.create(model=MODEL, prompt=ids, max_tokens=12,
                                             temperature=0)
    assert out.specframe["token_ids"] == reference.generate(ids, 12).token_ids


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_streaming_equals_the_full_answer_and_never_splits_a_character(server, reference, chat):
    client, prompt = server.client(), "Question 3: name 3 rivers."
    if chat:
        kwargs = dict(model=MODEL, messages=[{"role": "user", "content": prompt}], max_tokens=40, temperature=0)
        full = client.chat.completions.create(**kwargs).choices[0].message.content
        text, chunks = stream_text(client.chat.completions.create(**kwargs, stream=True,
                                                                  stream_options={"include_usage": True}), chat)
        ref = reference.generate(chat_ids(reference, prompt), 40)
    else:
        kwargs = dict(model=MODEL, prompt=prompt, max_tokens=40, temperature=0)
        full = client.completions.create(**kwargs).choices[0].text
        text, chunks = stream_text(client.completions.create(**kwargs, stream=True,
                                                             stream_options={"include_usage": True}), chat)
        ref = reference.generate(reference.target.encode(prompt, chat=False), 40)
    assert text == full == ref.text
    assert any(ord(c) > 0x7F and c != "\ufffd" for c in text), "the test output should hold a multi-byte character"
    deltas = [(c.choices[0].delta.content if chat else c.choices[0].text) or "" for c in chunks if c.choices]
    assert not any(d.endswith("\ufffd") for d in deltas)  # no character is sent in pieces
    assert chunks[-1].usage.completion_tokens == 40 and chunks[-1].choices == []
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_raw_stream_is_server_sent_events_ending_with_done(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 6,
                            "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    first = json.loads(events[0][6:])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"
    last = json.loads(events[-2][6:])
    assert last["choices"][0]["finish_reason"] == "length" and last["specframe"]["steps"] >= 1


@pytest.mark.parametrize("stream", [False, True], ids=["full", "streamed"])
def test_stop_strings_cut_as_plain_decoding_would(server, reference, stream):
    prompt = "Question 5: name 5 rivers."
    ref = reference.generate(reference.target.encode(prompt, chat=False), 40)
    clean = [i for i in range(len(ref.text) - 3) if "\ufffd" not in ref.text[i:i + 3]]
    stop = ref.text[clean[len(clean) // 2]:][:3]  # a stop from the middle of the answer
    expected, tokens = plain_stop(reference, ref.token_ids, [stop, "never-there"])
    request = dict(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "never-there"])
    if stream:
        text, chunks = stream_text(server.client().completions.create(**request, stream=True), chat=False)
        reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
    else:
        out = server.client().completions.create(**request)
        text, reason = out.choices[0].text, out.choices[0].finish_reason
        assert out.usage.completion_tokens == tokens and out.specframe["token_ids"] == ref.token_ids[:tokens]
    assert text == expected and stop not in text and reason == "stop"


def test_seeded_sampling_reproduces_under_bastion_too(server, tiny_dir):
    """The sample verifier draws once per output position, so a seed gives the same tokens whatever trees
    BASTION builds (and whatever it has learned between the requests) — the same as plain decoding."""
    request = dict(model=MODEL, prompt="The river runs", max_tokens=16, temperature=1.0, seed=11)
    outs = [server.client().completions.create(**request).specframe["token_ids"] for _ in range(3)]
    gen = SpecGenerator(Target.load(str(tiny_dir), dtype="float64"), "ar")
    ids = gen.target.encode("The river runs", chat=False)
    assert outs[0] == outs[1] == outs[2] == gen.generate(ids, 16, temperature=1.0, seed=11).token_ids


def test_32_concurrent_requests_all_complete_unmixed_and_metrics_add_up(server, reference):
    prompts = [f"Question {i}: name {i} rivers." for i in range(32)]
    expected = [reference.generate(chat_ids(reference, p) if i % 2 else reference.target.encode(p, chat=False), 10).text
                for i, p in enumerate(prompts)]
    assert len(set(expected)) >= 16  # the prompts ask for distinguishable answers
    before = server.metrics()

    def ask(i: int):
        client = server.client()
        if i % 2:
            kwargs = dict(model=MODEL, messages=[{"role": "user", "content": prompts[i]}], max_tokens=10, temperature=0)
            if i % 4 == 1:
                return stream_text(client.chat.completions.create(**kwargs, stream=True, stream_options={
                    "include_usage": True}), chat=True)[0], None
            out = client.chat.completions.create(**kwargs)
            return out.choices[0].message.content, out.usage
        kwargs = dict(model=MODEL, prompt=prompts[i], max_tokens=10, temperature=0)
        if i % 4 == 2:
            return stream_text(client.completions.create(**kwargs, stream=True), chat=False)[0], None
        out = client.completions.create(**kwargs)
        return out.choices[0].text, out.usage

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, range(32), timeout=600))
    assert [text for text, _ in results] == expected
    after = server.metrics()
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    assert delta["vllm:request_success_total"] == 32 == delta["vllm:request_success_total{finished_reason=length}"]
    assert delta["vllm:generation_tokens_total"] == 32 * 10
    prompt_tokens = sum(len(chat_ids(reference, p) if i % 2 else reference.target.encode(p, chat=False))
                        for i, p in enumerate(prompts))
    assert delta["vllm:prompt_tokens_total"] == prompt_tokens
    assert delta["specframe:http_requests_total{route=/v1/chat/completions,status=200}"] == 16
    assert delta["specframe:http_requests_total{route=/v1/completions,status=200}"] == 16
    assert after["vllm:num_requests_waiting"] == 0 and after["vllm:num_requests_running"] == 0
    # the speculative counters are consistent with each other
    drafts, drafted = after["vllm:spec_decode_num_drafts_total"], after["vllm:spec_decode_num_draft_tokens_total"]
    accepted = after["vllm:spec_decode_num_accepted_tokens_total"]
    per_pos = [after.get(f"vllm:spec_decode_num_accepted_tokens_per_pos_total{{position={p}}}", 0.0) for p in range(64)]
    assert 0 <= accepted <= drafted and drafts <= after["specframe:steps_total"]
    assert sum(per_pos) == accepted and per_pos[0] <= drafts
    assert all(a >= b for a, b in zip(per_pos, per_pos[1:]))  # a position is accepted only after the one before
    assert after["specframe:mean_acceptance_length"] == pytest.approx(1 + accepted / after["specframe:steps_total"])


# ---------------------------------------------------------------------- bad input: 4xx, OpenAI-shaped, names the field
LONG = " ".join(["river"] * 300)
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "hi"}]
BAD = [
    ("malformed-json", CHAT, '{"model": "tiny", "messages": [', 400, None),
    ("not-an-object", COMPLETIONS, "[1, 2]", 400, None),
    ("no-messages", CHAT, {"model": MODEL, "max_tokens": 4}, 400, "messages"),
    ("empty-messages", CHAT, {"model": MODEL, "messages": []}, 400, "messages"),
    ("bad-role", CHAT, {"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ("no-prompt", COMPLETIONS, {"model": MODEL, "max_tokens": 4}, 400, "prompt"),
    ("unknown-model", CHAT, {"model": "gpt-9", "messages": MSG}, 404, "model"),
    ("negative-temperature", CHAT, {"model": MODEL, "messages": MSG, "temperature": -0.5}, 400, "temperature"),
    ("top-p-zero", COMPLETIONS, {"model": MODEL, "prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("top-p-above-one", COMPLETIONS, {"model": MODEL, "prompt": "hi", "top_p": 1.5}, 400, "top_p"),
    ("max-tokens-zero", COMPLETIONS, {"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max-tokens-negative", CHAT, {"model": MODEL, "messages": MSG, "max_tokens": -3}, 400, "max_tokens"),
    ("max-completion-tokens-zero", CHAT, {"model": MODEL, "messages": MSG, "max_completion_tokens": 0}, 400,
     "max_completion_tokens"),
    ("n-two", CHAT, {"model": MODEL, "messages": MSG, "n": 2}, 400, "n"),
    ("negative-top-k", COMPLETIONS, {"model": MODEL, "prompt": "hi", "top_k": -1}, 400, "top_k"),
    ("empty-stop", COMPLETIONS, {"model": MODEL, "prompt": "hi", "stop": [""]}, 400, "stop"),
    ("token-outside-vocabulary", COMPLETIONS, {"model": MODEL, "prompt": [1, 99999]}, 400, "prompt"),
    ("prompt-longer-than-context", COMPLETIONS, {"model": MODEL, "prompt": LONG, "max_tokens": 4}, 400, "prompt"),
    ("messages-longer-than-context", CHAT, {"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400,
     "messages"),
    ("max-tokens-past-context", COMPLETIONS, {"model": MODEL, "prompt": "hi", "max_tokens": 1000}, 400, "max_tokens"),
]


@pytest.mark.parametrize("path, body, status, param", [pytest.param(*b[1:], id=b[0]) for b in BAD])
def test_bad_input_is_a_4xx_naming_the_field(server, path, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = httpx.post(f"{server.url}{path}", content=content, headers={"content-type": "application/json"},
                          timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == param and error["message"] and "Traceback" not in response.text
    if param is not None:
        assert param in error["message"]


def test_unknown_route_is_an_openai_shaped_404(server):
    response = httpx.get(f"{server.url}/v1/nothing-here")
    assert response.status_code == 404 and set(response.json()["error"]) == {"message", "type", "param", "code"}


def test_bad_input_through_the_openai_client(server):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        server.client().chat.completions.create(model=MODEL, messages=MSG, top_p=2.0)
    with pytest.raises(openai.NotFoundError):
        server.client().chat.completions.create(model="gpt-9", messages=MSG)


# ---------------------------------------------------------------------- the embedded SmolLM2
@pytest.mark.slow
def test_embedded_model_through_http_is_plain_decoding(tmp_path):
    srv = Server(CLI[:-1] + ["2", "serve", "--policy", "bastion", "--port", "{port}", "--log-level", "warning"],
                 tmp_path / "server.log")
    try:
        srv.wait_ready(600)
        client = srv.client()
        messages = [{"role": "user", "content": "Name three rivers in Europe."}]
        out = client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=24, temperature=0)
        text, _ = stream_text(client.chat.completions.create(model="smollm2-135m", messages=messages, max_tokens=24,
                                                             temperature=0, stream=True), chat=True)
    finally:
        srv.stop()
    gen = SpecGenerator(load_target(None), "ar")  # the backend `serve` chose (auto): its own plain decoding
    ref = gen.generate(gen.target.encode_messages(messages), 24)
    assert out.specframe["token_ids"] == ref.token_ids and out.choices[0].message.content == ref.text == text
    assert out.specframe["tau"] >= 1
