"""The DFlash block-diffusion drafter: checkpoint round trip, block attention, parity, training."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM
from click.testing import CliRunner

from specframe import Registry, SpecGenerator, Target
from specframe.cli import cli
from specframe.errors import SpecframeError
from specframe.plugins.dflash import DFlashDrafter, DFlashModel
from specframe.plugins.dflash_train import (
    FeatureStore,
    TrainConfig,
    block_batch,
    new_drafter,
    read_rows,
    target_features,
    train,
)

from conftest import TinyTokenizer


def _target(arch: str = "llama", seed: int = 0) -> Target:
    torch.manual_seed(seed)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256)
    model = LlamaForCausalLM(LlamaConfig(**common)) if arch == "llama" else Qwen3ForCausalLM(Qwen3Config(head_dim=8, **common))
    return Target(model.double(), TinyTokenizer(), f"tiny-{arch}")


def _drafter_dir(target, tmp_path, block=4, layers=(0, 2), seed=1):
    torch.manual_seed(seed)
    model = new_drafter(target, TrainConfig(block_size=block, num_layers=1, target_layer_ids=list(layers), mask_token_id=63))
    with torch.no_grad():  # make it less trivial than a copy of the target
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save(tmp_path / "drafter", dtype=torch.float32)
    return model, tmp_path / "drafter"


@pytest.fixture(params=["llama", "qwen3"])
def target(request):
    return _target(request.param)


def test_published_layout_and_reload_gives_identical_marginals(target, tmp_path):
    model, path = _drafter_dir(target, tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["dflash_config"] == {"block_size": 4, "mask_token_id": 63, "target_layer_ids": [0, 2]}
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as fh:
        names = set(fh.keys())
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.0.self_attn.q_proj.weight",
            "layers.0.mlp.down_proj.weight"} <= names
    assert ("layers.0.self_attn.q_norm.weight" in names) == (target.text_config.model_type == "qwen3")

    ids = [5, 9, 11, 3, 7, 2]
    feats = target_features(target, ids[:-1], (0, 2))
    drafter = DFlashDrafter(target=target, path=str(path))
    drafter.start(ids, feats)
    got = drafter.marginals(ids[-1])
    # reference straight from the in-memory model
    model = model.double().eval()
    with torch.no_grad():
        ctx = model.context(feats)
        kv = model.context_kv(ctx, torch.arange(len(ids) - 1))
        block = torch.tensor([ids[-1], 63, 63, 63])
        h = model(torch.nn.functional.embedding(block, target.embedding_weight()), torch.arange(5, 9), kv)
        want = torch.log_softmax(torch.nn.functional.linear(h[1:], target.lm_head_weight()).float(), -1)
    assert got.shape == (3, 64)
    assert torch.allclose(got, want, atol=1e-6)


def test_incremental_context_cache_matches_one_shot(tmp_path):
    """Committing features step by step gives the same marginals as seeing them all at once."""
    target = _target()
    _, path = _drafter_dir(target, tmp_path)
    ids = [5, 9, 11, 3, 7, 2, 8, 4]
    feats = target_features(target, ids[:-1], (0, 2))
    one = DFlashDrafter(target=target, path=str(path))
    one.start(ids, feats)
    inc = DFlashDrafter(target=target, path=str(path))
    inc.start(ids[:3], feats[:2])
    inc.marginals(ids[2])  # absorbs the first part
    inc.commit(ids[2:5], feats[2:5])
    inc.commit(ids[5:7], feats[5:7])
    assert torch.allclose(one.marginals(ids[-1]), inc.marginals(ids[-1]), atol=1e-9)


def test_block_sees_only_context_before_its_anchor():
    target = _target()
    torch.manual_seed(3)
    model = new_drafter(target, TrainConfig(block_size=4, num_layers=1, target_layer_ids=[0, 2], mask_token_id=63)).double()
    tokens = np.array([4, 8, 15, 16, 23, 42, 7, 9, 1, 2])
    feats = target_features(target, tokens[:-1].tolist(), (0, 2)).numpy()
    anchor = 5

    def block_out(tok, fts):
        ids, pos, _, mask = block_batch(tok, 2, [anchor], 4, 63)
        kv = model.context_kv(model.context(torch.from_numpy(fts)), torch.arange(len(fts)))
        with torch.no_grad():
            return model(torch.nn.functional.embedding(ids, target.embedding_weight()), pos, kv, mask)

    base = block_out(tokens, feats)
    later = feats.copy()
    later[anchor:] += 1.0  # features at and after the anchor are not context
    tok_later = tokens.copy()
    tok_later[anchor + 1 :] = 0  # tokens after the anchor are what the block must guess
    assert torch.allclose(base, block_out(tok_later, later), atol=1e-10)
    earlier = feats.copy()
    earlier[anchor - 1] += 1.0
    assert not torch.allclose(base, block_out(tokens, earlier), atol=1e-6)


@pytest.mark.parametrize("policy", sorted(Registry().policies))
def test_greedy_parity_with_dflash_drafter(target, tmp_path, policy):
    _, path = _drafter_dir(target, tmp_path)
    prompt = [3, 14, 15, 9, 2, 6, 5, 3]
    ref = SpecGenerator(target, "ar").generate(prompt, 24).token_ids
    ids = list(prompt)
    for _ in range(24):  # plain greedy decoding, no cache
        ids.append(int(target.model(torch.tensor([ids])).logits[0, -1].argmax()))
    assert ref == ids[len(prompt):]
    gen = SpecGenerator(target, policy, drafter=f"dflash:{path}")
    assert gen.generate(prompt, 24).token_ids == ref


def test_checkpoint_that_does_not_fit_is_one_clear_error(tmp_path):
    small = _target()
    _, path = _drafter_dir(small, tmp_path)
    torch.manual_seed(0)
    other = Target(LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=4,
                                                num_attention_heads=4, num_key_value_heads=2)).double(), TinyTokenizer(), "wide")
    with pytest.raises(SpecframeError, match=r"hidden size 32 .* hidden size 48"):
        DFlashDrafter(target=other, path=str(path))
    with pytest.raises(SpecframeError, match="not found|missing"):
        DFlashDrafter(target=small, path=str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpecframeError, match="config.json"):
        DFlashDrafter(target=small, path=str(tmp_path / "empty"))


def test_training_data_without_usable_rows_is_a_clear_error(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"sharegpt_index": 10, "prompt_ids": [1, 2], "response_ids": [3, 4, 5]}) + "\n"
                 + json.dumps({"sharegpt_index": 11, "prompt_ids": [1, 2], "response_ids": [3]}) + "\n")
    with pytest.raises(SpecframeError, match="no usable sequences"):
        read_rows([str(f)], 128)


def test_training_smoke_reduces_loss(tmp_path):
    """A short run on the target's own greedy continuations lowers the held-out block loss."""
    target = _target()
    gen = SpecGenerator(target, "ar")
    rng = random.Random(0)
    rows = []
    for _ in range(24):
        prompt = [rng.randrange(64) for _ in range(rng.randrange(3, 8))]
        rows.append((prompt, gen.generate(prompt, 20).token_ids))
    store = FeatureStore(tmp_path / "features")
    cfg = TrainConfig(block_size=4, num_layers=1, target_layer_ids=[0, 2], mask_token_id=63, steps=60, batch_size=4,
                      anchors_per_seq=4, lr=3e-3, warmup=5, eval_every=1000, save_every=30, eval_sequences=8)
    store.extract(target, rows, (0, 2), shard_rows=8, log=lambda msg: None)
    assert store.meta["rows_done"] == 24 and len(store.sequences()) == 24
    first = TrainConfig(**{**cfg.__dict__, "steps": 1})
    ckpt = train(target, store, tmp_path / "a", first, log=lambda msg: None)
    start = json.loads((ckpt / "trainer.json").read_text())["history"][-1]["eval_loss"]
    ckpt = train(target, store, tmp_path / "b", cfg, log=lambda msg: None)
    history = json.loads((ckpt / "trainer.json").read_text())["history"]
    assert history[-1]["step"] == 60
    assert history[-1]["eval_loss"] < start - 0.05
    # resuming a finished run is a no-op that keeps the step count
    ckpt = train(target, store, tmp_path / "b", cfg, log=lambda msg: None)
    assert json.loads((ckpt / "trainer.json").read_text())["step"] == 60
    assert isinstance(DFlashModel.load(ckpt), DFlashModel)


def _own_rows(target, n=24, new=20, seed=0):
    gen = SpecGenerator(target, "ar")
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [rng.randrange(64) for _ in range(rng.randrange(3, 8))]
        rows.append((prompt, gen.generate(prompt, new).token_ids))
    return rows


def test_draft_vocabulary_round_trip_and_proposals_stay_inside(target, tmp_path):
    """A checkpoint with a draft vocabulary reloads to the same marginals over exactly those tokens, and
    every proposal is one of them; the full-vocabulary marginals restricted to it agree up to normalisation."""
    model, path = _drafter_dir(target, tmp_path)
    vocab = torch.tensor([5, 9, 17, 33, 40, 41, 60, 2])
    full = DFlashDrafter(target, str(path), top_k=4)
    model.set_draft_vocab(vocab)
    model.save(tmp_path / "dv", dtype=torch.float32)
    cfg = json.loads((tmp_path / "dv" / "config.json").read_text())
    assert cfg["dflash_config"]["draft_vocab_size"] == 8
    cut = DFlashDrafter(target, str(tmp_path / "dv"), top_k=4)
    assert torch.equal(cut.vocab, vocab)
    ids = [3, 7, 11, 2, 5, 8]
    feats = target_features(target, ids[:-1], tuple(model.cfg.target_layer_ids))
    for d in (full, cut):
        d.start(ids[:-1], feats)
    lf, lc = full.marginals(ids[-1]), cut.marginals(ids[-1])
    assert lc.shape == (model.cfg.block_size - 1, 8)
    assert torch.allclose(lc, torch.log_softmax(lf[:, vocab], dim=-1), atol=1e-9)
    draft = cut.propose(ids, 3)
    proposed = {c.token for d in range(3) for c in draft.children(draft.ROOT, d)}
    assert len(proposed) >= 4 and proposed <= set(vocab.tolist())


def test_draft_vocabulary_outside_the_target_is_one_clear_error(tmp_path):
    target = _target()
    model, _ = _drafter_dir(target, tmp_path)
    model.set_draft_vocab(torch.tensor([1, 2, 64]))
    model.save(tmp_path / "bad", dtype=torch.float32)
    with pytest.raises(SpecframeError, match="draft vocabulary holds token id 64.*vocabulary \\[0, 64\\)"):
        DFlashDrafter(target, str(tmp_path / "bad"))


@pytest.mark.parametrize("policy", ["chain", "best-first"])
def test_greedy_parity_with_a_draft_vocabulary(tmp_path, policy):
    target = _target()
    model, _ = _drafter_dir(target, tmp_path)
    model.set_draft_vocab(torch.arange(0, 64, 3))
    model.save(tmp_path / "dv", dtype=torch.float32)
    ar = SpecGenerator(target, "ar")
    gen = SpecGenerator(target, policy, drafter=f"dflash:{tmp_path / 'dv'}")
    for prompt in ([1, 2, 3], [9, 8, 7, 6, 5]):
        assert gen.generate(prompt, 24).token_ids == ar.generate(prompt, 24).token_ids


def test_training_with_a_draft_vocabulary_and_growing_data_keeps_its_held_out_rows(tmp_path):
    """--draft-vocab trains a head over the most frequent answer tokens; a resume over a larger feature
    cache keeps the first run's held-out sequences (new rows only join training) and its vocabulary."""
    target = _target()
    rows = _own_rows(target, n=32)
    store = FeatureStore(tmp_path / "features")
    store.extract(target, rows[:20], (0, 2), shard_rows=8, log=lambda msg: None)
    cfg = TrainConfig(block_size=4, num_layers=1, target_layer_ids=[0, 2], mask_token_id=63, steps=20, batch_size=4,
                      anchors_per_seq=4, lr=3e-3, warmup=5, eval_every=1000, save_every=1000, eval_sequences=8,
                      draft_vocab=12)
    ckpt = train(target, store, tmp_path / "w", cfg, log=lambda msg: None)
    first = json.loads((ckpt / "trainer.json").read_text())
    model = DFlashModel.load(ckpt)
    assert model.cfg.draft_vocab_size == 12
    answers = np.concatenate([np.asarray(resp) for i, (_, resp) in enumerate(rows[:20]) if i not in first["eval_rows"]])
    counts = np.bincount(answers, minlength=64)
    assert counts[model.draft_vocab.numpy()].min() >= np.sort(counts)[-12]  # the 12 most frequent
    assert len(first["eval_rows"]) == 2 and first["train_sequences"] == 18
    store.extract(target, rows, (0, 2), shard_rows=8, log=lambda msg: None)  # 12 more rows
    assert len(store.sequences()) == 32
    ckpt = train(target, store, tmp_path / "w", TrainConfig(**{**cfg.__dict__, "steps": 30, "draft_vocab": 50}),
                 log=lambda msg: None)
    second = json.loads((ckpt / "trainer.json").read_text())
    assert second["eval_rows"] == first["eval_rows"] and second["train_sequences"] == 30
    again = DFlashModel.load(ckpt)
    assert torch.equal(again.draft_vocab, model.draft_vocab)  # fixed by the first run
    assert second["history"][-1]["step"] == 30


def test_init_from_a_drafter_keeps_its_held_out_rows_and_restarts_the_schedule(tmp_path):
    target = _target()
    rows = _own_rows(target, n=24)
    store = FeatureStore(tmp_path / "w1" / "features")
    store.extract(target, rows, (0, 2), shard_rows=8, log=lambda msg: None)
    cfg = TrainConfig(block_size=4, num_layers=1, target_layer_ids=[0, 2], mask_token_id=63, steps=10, batch_size=4,
                      anchors_per_seq=4, lr=3e-3, warmup=2, eval_every=1000, save_every=1000, eval_sequences=8)
    first = train(target, store, tmp_path / "w1", cfg, log=lambda msg: None)
    exported = tmp_path / "exported"
    from specframe.plugins.dflash_train import export

    export(first, exported, dtype=torch.float32)
    card = (exported / "TRAINING.md").read_text()
    assert "| 10 |" in card and "slot 3" in card and "3 held-out" not in card
    before = json.loads((first / "trainer.json").read_text())
    again = TrainConfig(**{**cfg.__dict__, "steps": 6, "init_from": str(exported)})
    logs: list[str] = []
    ckpt = train(target, store, tmp_path / "w2", again, log=logs.append)
    after = json.loads((ckpt / "trainer.json").read_text())
    assert after["eval_rows"] == before["eval_rows"] and after["step"] == 6
    assert after["init_history"] == before["history"]
    assert any("starting from the weights" in m for m in logs)
    w0 = DFlashModel.load(exported).state_dict()["fc.weight"]
    w1 = DFlashModel.load(ckpt).state_dict()["fc.weight"]
    assert not torch.equal(w0, w1) and (w0 - w1).abs().max() < 0.5  # trained further, from there
    res = CliRunner().invoke(cli, ["train-drafter", "--init-from", str(tmp_path / "nope"), "--work", str(tmp_path / "w3")])
    assert res.exit_code == 2 and "--init-from needs a drafter directory" in res.output
