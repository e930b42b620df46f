"""Drafter training data: prompt sources, batched greedy answers, and training on several feature caches."""

from __future__ import annotations

import json
import random

import pytest
from click.testing import CliRunner

from specframe import datasets
from specframe.cli import cli
from specframe.datasets import python_stdlib, python_stdlib_methods, training_prompts
from specframe.errors import SpecframeError
from specframe.plugins.dflash_train import FeatureStore, TrainConfig, generate_data, greedy_batch, read_rows, train

from conftest import new_target, plain_greedy


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma"])
def test_batched_greedy_equals_plain_greedy_for_prompts_of_any_length(arch):
    """Left padding, per-row positions and EOS cuts: every row of one batch is exactly its own greedy answer."""
    target = new_target(arch, eos=7)
    rng = random.Random(1)
    prompts = [[rng.randrange(8, 96) for _ in range(rng.randrange(1, 20))] for _ in range(6)]
    answers = greedy_batch(target, prompts, 24)
    for prompt, answer in zip(prompts, answers):
        assert answer == plain_greedy(target.model, prompt, 24, {7})


def _package(root):
    (root / "pkg").mkdir()
    (root / "pkg" / "tests").mkdir()
    (root / "pkg" / "mod.py").write_text(
        'import os\nfrom typing import List\n\n\n'
        'def documented(xs: List[int]) -> int:\n    """Return the sum of the numbers in xs, or zero when xs is empty."""\n'
        '    return sum(xs)\n\n\n'
        'def _private(x):\n    """A private helper that is documented at length but never offered."""\n    return x\n\n\n'
        'def undocumented(x):\n    return x\n\n\n'
        'def only_doc():\n    """A function with a long enough docstring and no body after it at all."""\n')
    (root / "pkg" / "tests" / "test_mod.py").write_text(
        'def test_thing():\n    """A test function with a long docstring that must be skipped anyway."""\n    assert 1\n')


def test_python_stdlib_cuts_humaneval_shaped_stubs(tmp_path):
    _package(tmp_path)
    stubs = python_stdlib(root=tmp_path)
    assert [p.id for p in stubs] == ["stdlib-pkg.mod.documented"]
    text = stubs[0].text
    assert text.startswith("import os\nfrom typing import List\n\n\ndef documented(xs: List[int]) -> int:\n")
    assert text.endswith('empty."""\n') and "return sum" not in text and stubs[0].chat is False


def test_python_stdlib_methods_cut_class_line_and_one_method_taking_modules_in_turn(tmp_path, monkeypatch):
    _package(tmp_path)
    (tmp_path / "pkg" / "cls.py").write_text(
        'import re\n\n\n@decorated\nclass Parser(Base):\n    """The class docstring is not part of a method stub."""\n\n'
        '    def parse(self, text: str) -> list:\n        """Split text into the words it holds, in order of appearance."""\n'
        '        return text.split()\n\n'
        '    def scan(self):\n        """Yield every token of the input, one at a time, until none is left."""\n        yield 1\n\n'
        '    def _hidden(self):\n        """A private method with a docstring that is long enough to count."""\n        return 0\n\n\n'
        'class _Private:\n    def open(self):\n        """A public method of a private class, which is never offered at all."""\n        return 1\n')
    (tmp_path / "pkg" / "other.py").write_text(
        'class Store:\n    def get(self, key):\n        """Return the value stored under key, or None when it is absent."""\n        return None\n')
    stubs = python_stdlib_methods(root=tmp_path)
    # modules take turns: cls, other, then cls again
    assert [p.id for p in stubs] == ["stdlib-pkg.cls.Parser.parse", "stdlib-pkg.other.Store.get", "stdlib-pkg.cls.Parser.scan"]
    assert stubs[0].text == ('import re\n\n\n@decorated\nclass Parser(Base):\n    def parse(self, text: str) -> list:\n'
                             '        """Split text into the words it holds, in order of appearance."""\n')
    assert [p.id for p in python_stdlib_methods(limit=2, root=tmp_path)] == [p.id for p in stubs[:2]]
    monkeypatch.setattr(datasets, "python_stdlib_methods", lambda limit=None: stubs[:limit])
    assert training_prompts(["python-stdlib-methods"], limit=1) == stubs[:1]


def test_training_prompts_refuse_evaluation_sets_and_interleave_sources(tmp_path):
    with pytest.raises(SpecframeError, match="'humaneval' is an evaluation set"):
        training_prompts(["humaneval"])
    with pytest.raises(SpecframeError, match="unknown prompt source 'nope'.*python-stdlib"):
        training_prompts(["nope"])
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"{i}", "chat": False}) + "\n" for i in range(3)))
    b.write_text(json.dumps({"prompt": "9", "chat": False}) + "\n")
    assert [p.text for p in training_prompts([str(a), str(b)])] == ["0", "9", "1", "2"]
    assert len(training_prompts([str(a), str(b)], limit=2)) == 2


def test_generated_data_is_the_targets_greedy_answers_and_resumes(tmp_path):
    target = new_target("llama", eos=7)
    src = tmp_path / "p.jsonl"
    prompts = [" ".join(str(8 + (3 * i + k) % 80) for k in range(2 + i % 5)) for i in range(5)]
    src.write_text("".join(json.dumps({"prompt": p, "chat": False}) + "\n" for p in prompts))
    out = tmp_path / "data.jsonl"
    generate_data(target, out, 3, 12, lambda m: None, sources=(str(src),), batch_size=2)
    generate_data(target, out, 5, 12, lambda m: None, sources=(str(src),), batch_size=2)  # resumes: 2 more
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(r["id"] for r in rows) == sorted(f"p-{i}" for i in range(5))
    for r in rows:
        assert r["response_ids"] == plain_greedy(target.model, r["prompt_ids"], 12, {7})
        assert r["finished"] == (r["response_ids"][-1] == 7)
    assert len(read_rows([str(out)], 128)) == sum(len(r["response_ids"]) >= 2 for r in rows)
    # a deadline already past: nothing new is made, and the log says how to go on
    said = []
    late = tmp_path / "late.jsonl"
    generate_data(target, late, 5, 12, said.append, sources=(str(src),), batch_size=2, deadline=0.0)
    assert late.read_text() == "" and said == ["data: deadline reached; rerun to continue"]


def test_training_on_two_feature_caches_adds_the_second_as_training_rows(tmp_path):
    target = new_target("llama")
    rng = random.Random(0)

    def cache(name, count):
        rows = [([rng.randrange(96) for _ in range(4)], [rng.randrange(96) for _ in range(12)]) for _ in range(count)]
        store = FeatureStore(tmp_path / name)
        store.extract(target, rows, (0, 1), log=lambda m: None)
        return store

    chat, code = cache("chat", 20), cache("code", 6)
    cfg = TrainConfig(block_size=4, num_layers=1, target_layer_ids=[0, 1], steps=4, batch_size=2, eval_every=2,
                      save_every=2, eval_sequences=4)
    ckpt = train(target, chat, tmp_path / "w", cfg, log=lambda m: None)
    held = json.loads((ckpt / "trainer.json").read_text())["eval_rows"]
    cfg.steps = 8
    ckpt = train(target, [chat, code], tmp_path / "w", cfg, log=lambda m: None)
    meta = json.loads((ckpt / "trainer.json").read_text())
    assert meta["eval_rows"] == held and meta["train_sequences"] == 26 - len(held) and meta["step"] == 8


def test_cli_names_a_missing_feature_cache(tmp_path):
    res = CliRunner().invoke(cli, ["train-drafter", "--work", str(tmp_path / "w"), "--stage", "train",
                                   "--features", str(tmp_path / "nowhere")])
    assert res.exit_code != 0 and "no feature cache at" in res.output and "nowhere" in res.output
