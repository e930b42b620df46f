"""A regular install behaves as the source tree does: the wheel carries the shipped drafters, maps
``plugins/`` and ``policies/`` into the package, and ``auto`` finds the shipped block drafter from there.
And ``auto`` never falls back silently: it says what it chose and why."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from specframe import Registry, SpecGenerator, make_plugin_set
from specframe.resolve import choose_drafter
from specframe.resources import shipped_drafters_dir

ROOT = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(".venv", ".git", "runs", "site", "build", "dist", "*.egg-info", "__pycache__",
                                 ".hypothesis", ".pytest_cache")


def save_model_dir(model, path: Path, vocab: int = 96) -> Path:
    """``model`` saved as a local model directory (safetensors) with a word-level tokenizer of its ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Tokenizer(models.WordLevel({str(i): i for i in range(vocab)}, unk_token="0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.save_pretrained(path, safe_serialization=True)
    PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(path)
    return path


# ---------------------------------------------------------------------- auto says why
def test_shipped_drafters_are_package_resources():
    root = shipped_drafters_dir()
    assert root == Path(__import__("specframe").__file__).parent / "drafters"
    assert (root / "smollm2-135m-instruct" / "model.safetensors").is_file()


def test_auto_on_a_target_without_a_shipped_drafter_says_why(tiny_target):
    registry = Registry(make_plugin_set(allow=set()))
    name, why = choose_drafter(registry, tiny_target, composite=True)
    assert name == "ngram"
    assert why.startswith("'hybrid' is not available (no shipped block drafter fits target 'tiny-llama' (hidden_size 32, num_layers 2")
    gen = SpecGenerator(tiny_target, "bastion", registry=registry)
    assert gen.components.notes == {"drafter": why}
    assert gen.generate([1, 2, 3], 2).to_dict()["components"]["auto"] == {"drafter": why}


def test_auto_with_the_shipped_drafters_missing_says_reinstall(tiny_target, monkeypatch, tmp_path):
    import specframe.plugins.dflash as dflash

    monkeypatch.setattr(dflash, "shipped_drafters_dir", lambda: tmp_path / "gone")
    name, why = choose_drafter(Registry(make_plugin_set(allow=set())), tiny_target)
    assert name == "ngram"
    assert f"specframe's shipped drafters are missing from {tmp_path / 'gone'}; reinstall specframe" in why


def test_run_prints_the_auto_fallback(monkeypatch, tmp_path, capsys):
    """`specframe run` on a model without a shipped drafter: one stderr line names the choice and the reason."""
    from click.testing import CliRunner

    from specframe.cli import cli
    from conftest import make_tiny_model

    path = save_model_dir(make_tiny_model("llama"), tmp_path / "tiny")
    result = CliRunner().invoke(cli, ["run", "--target", str(path), "--prompt", "1 2 3", "-n", "3", "--no-chat",
                                      "--json"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.startswith("specframe: drafter auto")]
    assert len(lines) == 1 and lines[0].startswith("specframe: drafter auto -> ngram: 'hybrid' is not available (no "
                                                   "shipped block drafter fits target")
    out = json.loads(result.stdout)
    assert out["components"]["names"]["drafter"] == "ngram" and out["components"]["policy"] == "bastion"


# ---------------------------------------------------------------------- the wheel
@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """Build specframe's wheel offline from a copy of this tree and install it (no deps) into a folder
    outside the source tree. Returns that folder (a site-packages of its own)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp / "dist"),
                          str(src)], check=True, capture_output=True, cwd=tmp)
    (wheel,) = (tmp / "dist").glob("specframe-*.whl")
    site = tmp / "site"
    subprocess.run(pip + ["install", "--no-deps", "--no-index", "--target", str(site), str(wheel)], check=True,
                   capture_output=True, cwd=tmp)
    return site


def _in_install(site: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``args`` from outside the source tree with only the installed copy of specframe importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    return subprocess.run(args, cwd=site.parent, env=env, capture_output=True, text=True, timeout=timeout)


def test_wheel_ships_the_drafters_and_maps_plugins_into_the_package(installed):
    drafter = installed / "specframe" / "drafters" / "smollm2-135m-instruct"
    assert (drafter / "config.json").is_file() and (drafter / "model.safetensors").is_file()
    assert (installed / "specframe" / "plugins" / "dflash.py").is_file()
    assert (installed / "specframe" / "policies" / "bastion.py").is_file()
    top = {p.name for p in installed.iterdir() if not p.name.endswith(".dist-info") and p.name != "bin"}
    assert top == {"specframe"}, "no generic top-level name (plugins, policies) may land in site-packages"
    probe = _in_install(installed, sys.executable, "-c", (
        "import json, specframe, importlib.metadata as md\n"
        "from specframe.resources import shipped_drafters_dir\n"
        "from specframe.registry import make_plugin_set\n"
        "ps = make_plugin_set(allow=set())\n"
        "print(json.dumps({'module': specframe.__file__, 'drafters': str(shipped_drafters_dir()),\n"
        "  'dist': str(md.distribution('specframe').locate_file('')),\n"
        "  'plugins': sorted(p.name for p in ps.plugins if p.builtin), 'problems': ps.problems}))"))
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert seen["module"] == str(installed / "specframe" / "__init__.py")
    assert seen["drafters"] == str(installed / "specframe" / "drafters")
    assert Path(seen["dist"]) == installed
    assert seen["problems"] == [] and "dflash" in seen["plugins"] and "bastion" in seen["plugins"]


def test_wheel_ships_the_rank_head_and_it_loads_from_package_data(installed):
    """SpecBlock's rank head beside the shipped drafter is package data: the installed copy loads it."""
    drafter = installed / "specframe" / "drafters" / "smollm2-135m-instruct"
    assert (drafter / "rank_head.safetensors").is_file() and (drafter / "rank_head.json").is_file()
    probe = _in_install(installed, sys.executable, "-c", (
        "import json, numpy as np\n"
        "from specframe.resources import shipped_drafters_dir\n"
        "from specframe.plugins.rank_blocks import RankHead\n"
        "head = RankHead.load(shipped_drafters_dir() / 'smollm2-135m-instruct')\n"
        "p = head.probs(np.zeros((7, head.feature_dim), np.float32))\n"
        "print(json.dumps({'dim': head.feature_dim, 'shape': list(p.shape), 'sums': p.sum(1).round(6).tolist()}))"))
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert seen["dim"] == 576 + 7 + 15 and seen["shape"] == [7, 4] and seen["sums"] == [1.0] * 7


@pytest.mark.slow
def test_installed_bastion_resolves_the_shipped_block_drafter(installed):
    """From the installed copy, `policies --json --target` and `run --json` on the embedded default in
    transformers: bastion's ``auto`` drafts with the target's own 4-bit GGUF where llama.cpp can run it
    (``model``), else with the hybrid of prompt lookup and the *installed* shipped block drafter, which
    `--drafter hybrid` finds in the installed copy either way (on llama.cpp, where hidden states cost every
    forward, ``auto`` leaves it out: test_llamacpp)."""
    script = installed / "bin" / "specframe"
    shipped = installed / "specframe" / "drafters" / "smollm2-135m-instruct"
    listed = _in_install(installed, str(script), "policies", "--json", "--target", "smollm2-135m", "--backend", "hf")
    assert listed.returncode == 0, listed.stderr
    bastion = next(row for row in json.loads(listed.stdout) if row["name"] == "bastion")
    chosen = bastion["resolved"]["names"]["drafter"]
    if chosen == "model":
        assert "4-bit GGUF" in bastion["resolved"]["auto"]["drafter"]
    else:
        assert chosen == "hybrid" and bastion["resolved"]["details"]["drafter"] == f"hybrid(ngram, dflash:{shipped})"
        assert "shipped block drafter" in bastion["resolved"]["auto"]["drafter"]
    ran = _in_install(installed, str(script), "run", "--backend", "hf", "--policy", "bastion", "--drafter", "hybrid",
                      "-n", "8", "--json")
    assert ran.returncode == 0, ran.stderr
    assert "drafter auto -> ngram" not in ran.stderr
    comps = json.loads(ran.stdout)["components"]
    assert comps["names"]["drafter"] == "hybrid" and comps["details"]["drafter"] == f"hybrid(ngram, dflash:{shipped})"
