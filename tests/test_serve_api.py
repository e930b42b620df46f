"""``specframe serve``'s OpenAI request surface: no field ignored in silence, and logprobs.

* Every OpenAI field the server does not implement is a 400 ``unsupported_field`` naming it (raw HTTP and
  the official ``openai`` client's ``BadRequestError``), its no-op values are accepted and change nothing,
  a field that is not OpenAI's at all is a 400 ``unknown_field``, and a message with null content is a 400
  naming ``messages[i].content``.
* ``logprobs`` (chat: ``logprobs``/``top_logprobs``; completions: ``logprobs`` 0..5, the legacy shape),
  streamed and not: the entries are the completion's tokens, their values the target's own log-softmax of a
  plain forward, the alternatives sorted, streamed entries == the full answer's, and a stop string cuts
  the entries where it cuts the text.

Most tests run the app in process (FastAPI's TestClient, the real worker thread) on test_serve's tiny
byte-level BPE model; one goes through the real server subprocess of test_serve.
"""

from __future__ import annotations

import json

import pytest
import torch

openai = pytest.importorskip("openai")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import MODEL, server, stream_text, tiny_dir  # noqa: E402,F401 - fixtures of the real server

from specframe import SpecGenerator, Target  # noqa: E402
from specframe.serve import ACCEPTED, NO_OP, TextStream, create_app  # noqa: E402

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "Name three rivers."}]
PROMPT = "The river runs"


@pytest.fixture(scope="module")
def gen(tiny_dir):  # noqa: F811
    return SpecGenerator(Target.load(str(tiny_dir), dtype="float64"), "bastion")


@pytest.fixture(scope="module")
def http(gen):
    with TestClient(create_app(gen, model_name=MODEL)) as client:
        yield client


@pytest.fixture(scope="module")
def oai(http):
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)


def kind(path: str) -> str:
    return "chat" if path == CHAT else "completions"


def post(http, path: str, body: dict):
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def base(path: str, **extra) -> dict:
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0}
    body.update({"messages": MSG} if path == CHAT else {"prompt": PROMPT})
    return {**body, **extra}


def assert_error(response, status: int, param: str, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code), error
    assert param in error["message"] and "Traceback" not in response.text
    return error


# ---------------------------------------------------------------------- unsupported fields: 400 naming them
UNSUPPORTED = [  # (endpoint, field, a value the server cannot honour)
    (CHAT, "tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    (CHAT, "tool_choice", "auto"),
    (CHAT, "tool_choice", "required"),
    (CHAT, "functions", [{"name": "f", "parameters": {}}]),
    (CHAT, "function_call", "auto"),
    (CHAT, "response_format", {"type": "json_object"}),
    (CHAT, "response_format", {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
    (CHAT, "frequency_penalty", 0.5),
    (CHAT, "presence_penalty", -1),
    (CHAT, "logit_bias", {"50": 10}),
    (CHAT, "audio", {"voice": "alloy", "format": "wav"}),
    (CHAT, "modalities", ["text", "audio"]),
    (CHAT, "prediction", {"type": "content", "content": "x"}),
    (CHAT, "reasoning_effort", "low"),
    (CHAT, "verbosity", "high"),
    (CHAT, "web_search_options", {}),
    (CHAT, "moderation", {"model": "omni-moderation-latest"}),
    (CHAT, "service_tier", "flex"),
    (CHAT, "store", True),
    (COMPLETIONS, "echo", True),
    (COMPLETIONS, "best_of", 3),
    (COMPLETIONS, "suffix", " end"),
    (COMPLETIONS, "frequency_penalty", 1.0),
    (COMPLETIONS, "presence_penalty", 0.1),
    (COMPLETIONS, "logit_bias", {"7": -100}),
]


def test_the_list_covers_every_no_op_field():
    assert {f for _, f, _ in UNSUPPORTED} == set(NO_OP)


@pytest.mark.parametrize("path, field, value", UNSUPPORTED,
                         ids=[f"{kind(p)}-{f}-{v!r}"[:60] for p, f, v in UNSUPPORTED])
def test_an_unsupported_field_is_a_400_naming_it(http, path, field, value):
    error = assert_error(post(http, path, base(path, **{field: value})), 400, field, "unsupported_field")
    assert "not supported by this server" in error["message"]


@pytest.mark.parametrize("field, value", [("tools", UNSUPPORTED[0][2]), ("response_format", {"type": "json_object"}),
                                          ("logit_bias", {"50": 10}), ("presence_penalty", 1.0),
                                          ("reasoning_effort", "high"), ("store", True)])
def test_the_openai_client_gets_a_bad_request_error(oai, field, value):
    with pytest.raises(openai.BadRequestError, match="not supported by this server") as caught:
        oai.chat.completions.create(model=MODEL, messages=MSG, max_tokens=4, **{field: value})
    assert caught.value.body["param"] == field and caught.value.body["code"] == "unsupported_field"


def test_unsupported_completion_fields_through_the_openai_client(oai):
    for field, value in (("echo", True), ("best_of", 2), ("suffix", "x"), ("frequency_penalty", 2.0)):
        with pytest.raises(openai.BadRequestError) as caught:
            oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=4, **{field: value})
        assert caught.value.body["param"] == field


UNKNOWN = [  # not OpenAI fields (or not this endpoint's): never ignored in silence
    (CHAT, {"max_token": 5}, "max_token"),
    (CHAT, {"temprature": 0.5}, "temprature"),
    (CHAT, {"repetition_penalty": 1.1}, "repetition_penalty"),
    (CHAT, {"echo": False}, "echo"),  # a completions field
    (COMPLETIONS, {"top_logprobs": 2}, "top_logprobs"),  # a chat field
    (COMPLETIONS, {"messages": MSG}, "messages"),
    (COMPLETIONS, {"tools": []}, "tools"),
    (CHAT, {"stream": True, "stream_options": {"include_usag": True}}, "stream_options.include_usag"),
]


@pytest.mark.parametrize("path, extra, param", UNKNOWN, ids=[p for _, _, p in UNKNOWN])
def test_an_unknown_field_is_a_400_naming_it(http, path, extra, param):
    error = assert_error(post(http, path, base(path, **extra)), 400, param, "unknown_field")
    assert f"unknown field '{param}'" in error["message"]


def test_an_unknown_message_field_is_named_with_its_index(http):
    body = base(CHAT, messages=[MSG[0], {"role": "user", "content": "hi", "nmae": "bob"}])
    assert_error(post(http, CHAT, body), 400, "messages[1].nmae", "unknown_field")


# ---------------------------------------------------------------------- no-op values: accepted, nothing changes
NO_OPS = [
    (CHAT, {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}}),
    (CHAT, {"response_format": {"type": "text"}}),
    (CHAT, {"tools": [], "tool_choice": "none", "parallel_tool_calls": True}),
    (CHAT, {"functions": [], "function_call": "none"}),
    (CHAT, {"modalities": ["text"], "service_tier": "auto", "store": False, "verbosity": "medium"}),
    (CHAT, {"service_tier": "default"}),
    (CHAT, {"user": "u-1", "metadata": {"team": "a"}, "safety_identifier": "s", "prompt_cache_key": "k",
            "prompt_cache_retention": "24h"}),
    (CHAT, {"logprobs": False, "n": 1, "seed": None, "stop": None, "top_k": 0}),
    (CHAT, {"top_p": None, "n": None, "stream": None, "tools": None, "audio": None,
            "response_format": None, "reasoning_effort": None, "top_logprobs": None, "logprobs": None}),
    (CHAT, {"stream_options": None, "max_completion_tokens": None}),
    (COMPLETIONS, {"echo": False, "best_of": 1, "suffix": "", "user": "u", "logit_bias": {}}),
    (COMPLETIONS, {"frequency_penalty": 0, "presence_penalty": 0, "logprobs": None, "n": 1}),
    (COMPLETIONS, {"echo": None, "best_of": None, "suffix": None, "top_p": None, "stop": None}),
]


@pytest.mark.parametrize("path, extra", NO_OPS, ids=[f"{kind(p)}-{'-'.join(e)}"[:70] for p, e in NO_OPS])
def test_no_op_values_are_accepted_and_change_nothing(http, path, extra):
    plain = post(http, path, base(path)).json()
    response = post(http, path, base(path, **extra))
    assert response.status_code == 200, response.text
    assert response.json()["specframe"]["token_ids"] == plain["specframe"]["token_ids"]
    assert response.json()["choices"][0]["logprobs"] is None


def test_null_temperature_is_the_default_1(http):
    sampled = post(http, COMPLETIONS, base(COMPLETIONS, temperature=1.0, seed=9)).json()["specframe"]["token_ids"]
    assert post(http, COMPLETIONS, base(COMPLETIONS, temperature=None, seed=9)).json()["specframe"][
        "token_ids"] == sampled


def test_completions_null_max_tokens_is_the_default_16(http):
    out = post(http, COMPLETIONS, {"model": MODEL, "prompt": PROMPT, "max_tokens": None, "temperature": 0}).json()
    assert out["usage"]["completion_tokens"] <= 16 and len(out["specframe"]["token_ids"]) == out["usage"][
        "completion_tokens"]


def test_accepted_metadata_is_documented():
    assert {"user", "metadata", "safety_identifier", "prompt_cache_key", "parallel_tool_calls"} <= set(ACCEPTED)


def test_stream_options_include_obfuscation_is_accepted(oai):
    chunks = list(oai.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3, temperature=0, stream=True,
                                              stream_options={"include_usage": True, "include_obfuscation": False}))
    assert chunks[-1].usage.completion_tokens == 3


# ---------------------------------------------------------------------- messages
@pytest.mark.parametrize("role", ["user", "system", "developer", "assistant"])
def test_null_content_is_a_400_naming_the_message(http, role):
    messages = [{"role": role, "content": None}, MSG[0]] if role != "user" else [MSG[0], {"role": "user",
                                                                                         "content": None}]
    index = 0 if role != "user" else 1
    error = assert_error(post(http, CHAT, base(CHAT, messages=messages)), 400, f"messages[{index}].content",
                         "invalid_value")
    assert "null" in error["message"]


def test_null_content_through_the_openai_client(oai):
    with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.content"):
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": None}], max_tokens=2)


BAD_MESSAGES = [
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}], "messages[1].tool_calls"),
    ([{"role": "user", "content": "hi"}, {"role": "tool", "content": "42", "tool_call_id": "c1"}], "messages[1].role"),
    ([{"role": "function", "content": "42", "name": "f"}], "messages[0].role"),
    ([{"role": "user", "content": "hi", "name": "bob"}], "messages[0].name"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}],
     "messages[0].content[0].type"),
    ([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "input_audio", "input_audio": {}}]}],
     "messages[0].content[1].type"),
]


@pytest.mark.parametrize("messages, param", BAD_MESSAGES, ids=[p for _, p in BAD_MESSAGES])
def test_what_a_message_cannot_carry_is_a_400_naming_it(http, messages, param):
    assert_error(post(http, CHAT, base(CHAT, messages=messages)), 400, param, "unsupported_field")


def test_text_parts_and_an_assistant_turn_are_accepted(http):
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "refusal": None},
             {"role": "user", "content": [{"type": "text", "text": "Name "}, {"type": "text", "text": "rivers."}]}]
    assert post(http, CHAT, base(CHAT, messages=parts)).status_code == 200


# ---------------------------------------------------------------------- logprob arguments
@pytest.mark.parametrize("path, extra, param", [
    (CHAT, {"top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    (COMPLETIONS, {"logprobs": 6}, "logprobs"),
    (COMPLETIONS, {"logprobs": -1}, "logprobs"),
    (COMPLETIONS, {"logprobs": True}, "logprobs"),
], ids=["top-without-logprobs", "top-with-logprobs-false", "top-21", "top-negative", "legacy-6", "legacy-negative",
        "legacy-bool"])
def test_bad_logprob_arguments_are_a_400(http, path, extra, param):
    response = post(http, path, base(path, **extra))
    assert response.status_code == 400 and response.json()["error"]["param"] == param, response.text


# ---------------------------------------------------------------------- logprobs: values from the target itself
def reference_logprobs(gen: SpecGenerator, prompt_ids: list[int], out_ids: list[int]) -> torch.Tensor:
    """(len(out_ids), V): the target's log-softmax before each output token, from one plain forward."""
    logits = gen.target.forward_plain(prompt_ids + out_ids)
    return torch.log_softmax(logits[len(prompt_ids) - 1: len(prompt_ids) - 1 + len(out_ids)].double(), dim=-1)


def chat_prompt(gen, messages=MSG) -> list[int]:
    return gen.target.encode_messages(messages)


def check_chat_entries(gen, content: list[dict], prompt_ids: list[int], out_ids: list[int], top: int, text: str):
    assert len(content) == len(out_ids)
    ref = reference_logprobs(gen, prompt_ids, out_ids)
    names = {t: gen.target.tokenizer.convert_ids_to_tokens(t) for t in out_ids}
    for j, (entry, token) in enumerate(zip(content, out_ids)):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["logprob"] == pytest.approx(ref[j, token].item(), abs=1e-4), (j, names[token])
        assert len(entry["top_logprobs"]) == top
        values = [alt["logprob"] for alt in entry["top_logprobs"]]
        assert values == sorted(values, reverse=True)
        best = ref[j].topk(top).values.tolist() if top else []
        assert values == pytest.approx(best, abs=1e-4)
        for alt in entry["top_logprobs"]:
            assert set(alt) == {"token", "logprob", "bytes"}
    eos = set(gen.target.eos_token_ids)
    kept = [e for e, t in zip(content, out_ids) if t not in eos]
    assert bytes(b for e in kept for b in e["bytes"]).decode("utf-8", "replace") == text  # the tokens' real bytes


@pytest.mark.parametrize("top", [0, 2, 5])
@pytest.mark.parametrize("sampling", [{"temperature": 0}, {"temperature": 1.0, "seed": 3, "top_p": 0.9}],
                         ids=["greedy", "sampled"])
def test_chat_logprobs_are_the_targets_own(gen, oai, top, sampling):
    out = oai.chat.completions.create(model=MODEL, messages=MSG, max_tokens=24, logprobs=True, top_logprobs=top,
                                      **sampling)
    ids = out.specframe["token_ids"]
    assert out.usage.completion_tokens == len(ids)
    content = [c.model_dump() for c in out.choices[0].logprobs.content]
    check_chat_entries(gen, content, chat_prompt(gen), ids, top, out.choices[0].message.content)


def test_chat_logprobs_without_top_logprobs_have_no_alternatives(gen, http):
    out = post(http, CHAT, base(CHAT, logprobs=True)).json()
    logprobs = out["choices"][0]["logprobs"]
    assert logprobs["refusal"] is None and all(e["top_logprobs"] == [] for e in logprobs["content"])
    assert len(logprobs["content"]) == out["usage"]["completion_tokens"]


def check_legacy(gen, logprobs: dict, prompt_ids: list[int], out_ids: list[int], top: int, text: str):
    assert set(logprobs) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"]) == len(
        logprobs["text_offset"]) == len(out_ids)
    ref = reference_logprobs(gen, prompt_ids, out_ids)
    for j, token in enumerate(out_ids):
        assert logprobs["token_logprobs"][j] == pytest.approx(ref[j, token].item(), abs=1e-4)
        alternatives = logprobs["top_logprobs"][j]
        values = list(alternatives.values())
        assert values == sorted(values, reverse=True)
        in_top = token in ref[j].topk(top).indices.tolist() if top else False
        assert len(alternatives) == (top if in_top else top + 1)  # the top k, and the chosen token
        assert alternatives[logprobs["tokens"][j]] == pytest.approx(logprobs["token_logprobs"][j])
        if top:
            assert values[0] == pytest.approx(ref[j].max().item(), abs=1e-4)
    offsets = logprobs["text_offset"]
    assert offsets == sorted(offsets) and all(0 <= o <= len(text) for o in offsets)


@pytest.mark.parametrize("top", [0, 1, 5])
def test_completion_logprobs_legacy_shape(gen, oai, top):
    out = oai.completions.create(model=MODEL, prompt=PROMPT, max_tokens=24, temperature=1.0, seed=5, logprobs=top)
    ids = out.specframe["token_ids"]
    check_legacy(gen, out.choices[0].logprobs.model_dump(), gen.target.encode(PROMPT, chat=False), ids, top,
                 out.choices[0].text)


def test_text_offsets_are_where_each_tokens_text_starts(http, gen):
    prompt = "count one two three"  # plain ASCII tokens: every offset is the length of the text before it
    out = post(http, COMPLETIONS, {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                                   "logprobs": 0}).json()
    ids = out["specframe"]["token_ids"]
    texts = [gen.target.decode(ids[:k]) for k in range(len(ids))]
    if all("\ufffd" not in t for t in texts):
        assert out["choices"][0]["logprobs"]["text_offset"] == [len(t) for t in texts]


# ---------------------------------------------------------------------- streamed == not streamed; stop strings
def stream_events(http, path: str, body: dict) -> list[dict]:
    with http.stream("POST", path, content=json.dumps({**body, "stream": True}),
                     headers={"content-type": "application/json"}) as response:
        assert response.status_code == 200
        lines = [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def streamed_entries(chunks: list[dict], chat: bool):
    """(text, entries): chat entries concatenated, or the legacy lists concatenated."""
    text, entries = "", [] if chat else {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for chunk in chunks:
        for choice in chunk["choices"]:
            text += (choice["delta"].get("content") or "") if chat else choice["text"]
            lp = choice["logprobs"]
            if lp is None:
                continue
            if chat:
                entries += lp["content"]
            else:
                for key in entries:
                    entries[key] += lp[key]
    return text, entries


def same_entries(a, b):
    """Equal tokens and bytes; log-probs equal up to float noise (a tree forward vs another tree's)."""
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) or a == pytest.approx(b, abs=1e-5) or (
        _strip(a) == _strip(b))


def _strip(x):
    if isinstance(x, dict):
        return {k: _strip(v) for k, v in x.items() if k not in ("logprob", "token_logprobs")}
    if isinstance(x, list):
        return [_strip(v) for v in x]
    return x


@pytest.mark.parametrize("stop", [None, "river", "\n"], ids=["no-stop", "stop-word", "stop-newline"])
@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completions"])
def test_streamed_logprobs_equal_the_full_answers_and_stop_where_the_text_stops(gen, http, chat, stop):
    path = CHAT if chat else COMPLETIONS
    lp = {"logprobs": True, "top_logprobs": 3} if chat else {"logprobs": 3}
    body = base(path, max_tokens=40, **lp, **({"stop": stop} if stop else {}))
    full = post(http, path, body).json()
    text, entries = streamed_entries(stream_events(http, path, body), chat)
    choice = full["choices"][0]
    assert text == (choice["message"]["content"] if chat else choice["text"])
    full_entries = choice["logprobs"]["content"] if chat else choice["logprobs"]
    same_entries(entries, full_entries)
    n = full["usage"]["completion_tokens"]
    assert n == len(full["specframe"]["token_ids"]) == len(full_entries if chat else full_entries["tokens"])
    if stop is None:
        return
    # the entries stop where the text does: the same tokens as the answer without the stop, cut at the
    # fewest tokens whose text holds the stop
    unstopped = post(http, path, base(path, max_tokens=40, **lp)).json()
    ids = unstopped["specframe"]["token_ids"]
    cut = next((k for k in range(1, len(ids) + 1) if stop in gen.target.decode(ids[:k])), len(ids))
    assert full["specframe"]["token_ids"] == ids[:cut]
    other = unstopped["choices"][0]["logprobs"]
    if chat:
        assert _strip(full_entries) == _strip(other["content"][:cut])
    else:
        assert _strip(full_entries) == _strip({k: v[:cut] for k, v in other.items()})


def test_a_stop_string_found_in_the_greedy_answer(gen, http):
    """Stop strings picked from the answer itself, so they really do cut it (wherever the tiny model goes)."""
    body = base(CHAT, max_tokens=40, logprobs=True, top_logprobs=1)
    full = post(http, CHAT, body).json()
    text, ids = full["choices"][0]["message"]["content"], full["specframe"]["token_ids"]
    for stop in {text[i: i + 2] for i in range(3, min(len(text) - 2, 30), 5)} - {""}:
        if "\ufffd" in stop:
            continue
        chunks = stream_events(http, CHAT, {**body, "stop": [stop]})
        streamed, entries = streamed_entries(chunks, chat=True)
        cut = next(k for k in range(1, len(ids) + 1) if stop in gen.target.decode(ids[:k]))
        assert streamed == gen.target.decode(ids[:cut]).split(stop)[0]
        assert len(entries) == cut and _strip(entries) == _strip(full["choices"][0]["logprobs"]["content"][:cut])


# ---------------------------------------------------------------------- TextStream with entries (in process)
def chars(ids: list[int]) -> str:
    return "".join(map(chr, ids))


def test_text_stream_releases_entries_with_their_text_and_none_past_a_stop():
    stream = TextStream(chars, ["STOP"])
    steps = [stream.step([ord(c) for c in part], list(part)) for part in ("ab", "cS", "TOPd")]
    assert [d for d, _ in steps] == ["ab", "c", ""]
    assert [[e for e, _ in es] for _, es in steps] == [["a", "b"], ["c"], ["S", "T", "O", "P"]]
    assert stream.end() == ("", [])
    assert len(stream.released) == stream.token_count == 7  # "d", past the stop, never released
    assert [o for _, o in stream.released] == [0, 1, 2, 3, 3, 3, 3]  # offsets never past the text


def test_text_stream_holds_a_split_characters_entries_until_it_completes(tiny_dir):  # noqa: F811
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir))
    text = "aé日ü"
    ids = tok(text)["input_ids"]
    stream = TextStream(lambda x: tok.decode(x))
    released = []
    for i in ids:
        delta, entries = stream.step([i], [i])
        released += [e for e, _ in entries]
        assert tok.decode(released) == stream.text  # an entry goes out with the delta that completes its text
    delta, entries = stream.end()
    assert released + [e for e, _ in entries] == ids and stream.text == text
    assert [o for _, o in stream.released] == sorted(o for _, o in stream.released)


def test_token_bytes_are_the_tokens_own(gen):
    from specframe.serve import TokenText

    names, text = TokenText(gen.target), "aé日ü the river\n"
    ids = gen.target.encode(text, chat=False)
    assert any(not names(i).raw.decode("utf-8", "ignore") for i in ids)  # some tokens are parts of characters
    assert b"".join(names(i).raw for i in ids).decode("utf-8") == text and all(names(i).exact for i in ids)
    assert [names(i).legacy for i in ids if names(i).raw in (b"\xc3",)] in ([], ["bytes:\\xc3"] * len(
        [i for i in ids if names(i).raw == b"\xc3"]))
    eos = gen.target.eos_token_ids[0]
    assert names(eos).text == "<|im_end|>" == names(eos).legacy


# ---------------------------------------------------------------------- through the real server
def test_streamed_chat_logprobs_through_the_real_server(server, gen):  # noqa: F811
    client = server.client()
    kwargs = dict(model=MODEL, messages=MSG, max_tokens=20, temperature=0, logprobs=True, top_logprobs=2)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    text, _ = stream_text(chunks, chat=True)
    entries = [e.model_dump() for c in chunks if c.choices and c.choices[0].logprobs
               for e in c.choices[0].logprobs.content]
    content = [e.model_dump() for e in full.choices[0].logprobs.content]
    assert text == full.choices[0].message.content and _strip(entries) == _strip(content)
    check_chat_entries(gen, content, chat_prompt(gen), full.specframe["token_ids"], 2, text)
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(model=MODEL, messages=MSG, tools=UNSUPPORTED[0][2])
