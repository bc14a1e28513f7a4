"""The family trainer on a tiny model: widths share one stream, save as loadable fp16 SAEs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from core.hooks import capture, forward
from core.pipeline.corpus import CorpusConfig, build_corpus, token_stream
from core.pipeline.debian_docs import Document
from core.pipeline.training import (
    TrainConfig,
    activation_batches,
    evaluate_and_report,
    train_family,
)
from core.saes import SaeSpec, load_sae
from core.text import tokenize, windows
from tests.conftest import CORPUS, device_waits


def make_corpus(out, tokenizer, unseen: int = 0):
    docs = [Document("local", f"d{i}", CORPUS[i:] + CORPUS[:i]) for i in range(0, 300, 7)]
    cfg = CorpusConfig(out_dir=out, train_tokens=1200, heldout_tokens=300, unseen_tokens=unseen,
                       sources=())
    build_corpus(cfg, tokenizer, docs)
    return out


@pytest.fixture()
def corpus_dir(tmp_path, gemma3):
    return make_corpus(tmp_path / "corpus", gemma3.tokenizer, unseen=300)


def test_windows_start_with_one_bos(gpt2):
    bos = gpt2.tokenizer.bos_token_id
    rows = list(windows(gpt2, iter([CORPUS] * 3), 16))
    assert rows and all(len(r) == 16 and r[0] == bos for r in rows)
    assert all(r[1] != bos for r in rows)
    assert any(bos in r[2:] for r in rows)  # documents are separated by BOS


def test_activation_batches_drop_bos_and_match_the_hook(gpt2, tmp_path):
    hook = "blocks.1.hook_resid_post"
    ids = token_stream(make_corpus(tmp_path, gpt2.tokenizer) / "train.jsonl")
    batches = activation_batches(gpt2, ids, hook, 16, batch_tokens=64,
                                 windows_per_forward=4, shuffle_tokens=256)
    batch = next(batches)
    assert batch.shape == (64, 32) and batch.dtype == torch.float32
    assert batch.device == gpt2.device
    # every row is the hook's activation of some non-BOS corpus token in its window
    windows_ = torch.cat([torch.full((len(ids) // 15, 1), gpt2.tokenizer.bos_token_id),
                          torch.tensor(ids[: len(ids) // 15 * 15].astype("int64")).view(-1, 15)], 1)
    with capture(gpt2, [hook]) as acts:
        forward(gpt2, windows_)
    every = acts[hook][windows_ != gpt2.tokenizer.bos_token_id]
    dist = torch.cdist(batch, every)
    assert dist.min(1).values.max() < 1e-3  # (typical distance between tokens: ~0.2)
    tok = tokenize(gpt2, [CORPUS])
    with capture(gpt2, [hook]) as acts:
        forward(gpt2, tok.input_ids)
    bos_act = acts[hook][0, 0]
    assert not any(torch.allclose(row, bos_act) for row in batch)


def test_family_trains_and_saves_loadable_fp16_saes(gemma3, corpus_dir, tmp_path):
    cfg = TrainConfig(corpus_dir=corpus_dir, out_dir=tmp_path / "saes",
                      hook_name="blocks.1.hook_resid_post", widths=(16, 32), k=4,
                      training_tokens=256 * 12, context_size=16, batch_tokens=256,
                      windows_per_forward=8, shuffle_tokens=1024, norm_batches=2,
                      warmup_steps=1)
    paths = train_family(cfg, gemma3)
    assert sorted(paths) == ["w16", "w32"]
    for name, width in (("w16", 16), ("w32", 32)):
        loaded = load_sae(SaeSpec("local", str(paths[name])), gemma3)
        assert loaded.d_sae == width and loaded.d_in == gemma3.d_model
        assert loaded.architecture == "jumprelu"
        assert loaded.sae.cfg.normalize_activations == "none"  # scale folded in
        meta = json.loads((paths[name] / "cfg.json").read_text())["metadata"]
        assert meta["hook_name"] == "blocks.1.hook_resid_post"
        assert meta["training_tokens"] == 256 * 12
        weights = paths[name] / "sae_weights.safetensors"
        from safetensors.torch import load_file

        assert load_file(weights)["W_dec"].dtype == torch.float16

    card = evaluate_and_report(cfg, gemma3, paths, seconds=1.0)
    text = card.read_text()
    assert "| w16 | 16 |" in text and "| w32 | 32 |" in text
    assert "never trained on" in text and "unseen" in text
    meta = json.loads((paths["w16"] / "cfg.json").read_text())["metadata"]
    assert meta["dataset_path"] == "corpus"  # names, not this machine's absolute paths
    assert not Path(meta["training_config"]["out_dir"]).is_absolute()
    from safetensors import safe_open

    with safe_open(str(card.parent / "firing_counts.safetensors"), "pt") as f:
        tokens = int(f.metadata()["tokens"])
        counts = f.get_tensor("w32")
    metrics = json.loads((card.parent / "metrics.json").read_text())
    assert tokens == metrics["results"][0]["tokens"] > 300  # held-out and unseen both counted
    assert counts.shape == (32,)
    assert metrics["results"][1]["dead_fraction"] == (counts == 0).double().mean().item()
    from core.pipeline.report import saved_metrics

    again = saved_metrics(card.parent)  # what --card-only rewrites the card from
    assert [m.fires for m in again][1] == counts.tolist()
    assert [m.summary() for m in again] == metrics["results"]
    assert (card.parent / "density.png").stat().st_size > 1000
    metrics = json.loads((card.parent / "metrics.json").read_text())
    assert [r["d_sae"] for r in metrics["results"]] == [16, 32]


def test_extra_corpora_join_the_stream_and_the_card_counts_passes(gemma3, corpus_dir, tmp_path):
    from core.pipeline.report import merged_manifest
    from core.pipeline.training import passes, recorded, train_ids

    extra = tmp_path / "samples"
    docs = [Document("samples", f"s{i}", "Once upon a time " * (5 + i)) for i in range(40)]
    build_corpus(CorpusConfig(out_dir=extra, train_tokens=400, heldout_tokens=20, sources=()),
                 gemma3.tokenizer, docs)
    cfg = TrainConfig(corpus_dir=corpus_dir, extra_corpora=(extra,), training_tokens=5000)
    bos = gemma3.tokenizer.bos_token_id
    main, more = (token_stream(Path(c) / "train.jsonl") for c in (corpus_dir, extra))
    ids = train_ids(cfg, bos)
    assert len(ids) == len(main) + 1 + len(more)
    assert ids[len(main)] == bos and (ids[len(main) + 1:] == more).all()
    assert passes(cfg) == pytest.approx(5000 / (len(main) + len(more)))
    assert recorded(cfg)["extra_corpora"] == ["samples"]  # a name, not this machine's path
    assert recorded(cfg)["passes_over_text"] == round(5000 / (len(main) + len(more)), 2)
    splits = merged_manifest(corpus_dir, cfg.extra_corpora)["splits"]
    assert splits["train (samples)"]["samples"]["tokens"] == sum(
        v["tokens"] for v in splits["train (samples)"].values())
    with pytest.raises(FileNotFoundError, match="build the corpus first"):
        TrainConfig(corpus_dir=corpus_dir, extra_corpora=(tmp_path / "nowhere",))


def test_dead_window_is_a_token_span_whatever_the_run_length(corpus_dir, monkeypatch):
    """sae_lens's trainer gets the dead window as 2M tokens of steps for a 20M- and a 100M-token
    run alike (it was a quarter of the run's steps: 25M tokens for 100M)."""
    import types

    from sae_lens.training import multi_sae_trainer

    from core.pipeline.training import dead_window_steps, fit_family, recorded

    seen = {}

    class Trainer:  # stands in for MultiSAETrainer: keeps its config, trains nothing
        def __init__(self, cfg, saes, hook_names, data_provider):
            seen["cfg"] = cfg

        def fit(self):
            return {}

    monkeypatch.setattr(multi_sae_trainer, "MultiSAETrainer", Trainer)
    lm = types.SimpleNamespace(d_model=16, device=torch.device("cpu"))
    for tokens in (20_000_000, 100_000_000):
        cfg = TrainConfig(corpus_dir=corpus_dir, training_tokens=tokens, widths=(32,), k=4)
        fit_family(cfg, lm, batches=iter(()))
        assert seen["cfg"].dead_feature_window == dead_window_steps(cfg) == 2_000_000 // 4096
        assert seen["cfg"].total_training_samples == tokens
    assert recorded(cfg)["dead_window_tokens"] == 2_000_000  # the card states it
    short = TrainConfig(corpus_dir=corpus_dir, dead_window_tokens=1000, batch_tokens=256)
    assert dead_window_steps(short) == 10  # never fewer than 10 steps
    with pytest.raises(ValueError, match="dead_window_tokens"):
        TrainConfig(corpus_dir=corpus_dir, dead_window_tokens=0)


def test_threshold_update_on_the_device_matches_sae_lens():
    """The family's BatchTopK SAEs update their running threshold as sae_lens does (the same
    values after every batch, an all-zero batch leaving it unchanged), without host syncs."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    from core.pipeline.training import _device_threshold_sae

    cfg = BatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4, device="cpu", dtype="float32",
                                     topk_threshold_lr=0.2)
    ours, theirs = _device_threshold_sae()(cfg), BatchTopKTrainingSAE(cfg)
    assert isinstance(ours, BatchTopKTrainingSAE) and type(ours) is not BatchTopKTrainingSAE
    gen = torch.Generator().manual_seed(0)
    seen = []
    for step in range(6):
        acts = torch.randn(16, 32, generator=gen).relu() * (step + 1)
        if step == 3:
            acts.zero_()  # nothing fired: the threshold stays
        for sae in (ours, theirs):
            sae.update_topk_threshold(acts)
        assert ours.topk_threshold.dtype == theirs.topk_threshold.dtype
        torch.testing.assert_close(ours.topk_threshold, theirs.topk_threshold)
        seen.append(float(ours.topk_threshold))
    assert seen[3] == seen[2] and len(set(seen)) == 5  # it moved, except on the empty batch


@pytest.mark.parametrize("n_dead", [0, 3, 40])
def test_aux_loss_without_the_dead_count_matches_sae_lens(n_dead):
    """The auxiliary loss the family computes on a GPU equals sae_lens's (value and gradients)
    with no dead latent, fewer than d_in // 2 and more, and never reads a value off the device."""
    from sae_lens import BatchTopKTrainingSAEConfig

    from core.pipeline.training import _device_threshold_sae, device_aux_loss

    cfg = BatchTopKTrainingSAEConfig(d_in=16, d_sae=64, k=4, device="cpu", dtype="float32",
                                     aux_loss_coefficient=0.5)
    sae = _device_threshold_sae()(cfg)
    gen = torch.Generator().manual_seed(n_dead)
    sae_in = torch.randn(32, 16, generator=gen)
    dead = torch.zeros(64, dtype=torch.bool)
    dead[torch.randperm(64, generator=gen)[:n_dead]] = True

    def loss(ours: bool):
        sae.zero_grad()
        hidden_pre = (sae_in @ sae.W_enc + sae.b_enc).detach().requires_grad_()
        sae_out = sae.decode(hidden_pre.relu())
        if ours:
            out, waits = device_waits(lambda: cfg.aux_loss_coefficient * device_aux_loss(
                sae_in, sae_out, hidden_pre, dead, sae.W_dec, cfg.rescale_acts_by_decoder_norm))
            assert waits == 0
        else:  # sae_lens's own (the CPU path of the family's SAE)
            out = sae.calculate_topk_aux_loss(sae_in, sae_out, hidden_pre, dead)
        if out.requires_grad:  # sae_lens returns a constant when nothing is dead
            out.backward()
        return out.detach(), [torch.zeros_like(t) if t.grad is None else t.grad.clone()
                              for t in (hidden_pre, sae.W_dec)]

    (ours, our_grads), (theirs, their_grads) = loss(True), loss(False)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(our_grads, their_grads):
        torch.testing.assert_close(a, b)
    assert (ours == 0) == (n_dead == 0)
    if n_dead:
        assert our_grads[0].abs().sum() > 0  # the dead latents learn from it


def test_sae_lens_aux_loss_reads_the_dead_count():
    """What the family's GPU path avoids: sae_lens reads the dead count off the device."""
    from sae_lens import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig

    cfg = BatchTopKTrainingSAEConfig(d_in=16, d_sae=64, k=4, device="cpu", dtype="float32")
    sae = BatchTopKTrainingSAE(cfg)
    x = torch.randn(8, 16)
    dead = torch.ones(64, dtype=torch.bool)
    _, waits = device_waits(lambda: sae.calculate_topk_aux_loss(x, x * 0.5, x @ sae.W_enc, dead))
    assert waits >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only on a GPU")
def test_threshold_update_makes_no_host_sync():
    from sae_lens import BatchTopKTrainingSAEConfig

    from core.pipeline.training import _device_threshold_sae

    cfg = BatchTopKTrainingSAEConfig(d_in=8, d_sae=32, k=4, device="cuda", dtype="float32")
    sae = _device_threshold_sae()(cfg)
    acts = torch.randn(16, 32, device="cuda").relu()
    torch.cuda.set_sync_debug_mode("error")
    try:
        sae.update_topk_threshold(acts)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host syncs exist only on a GPU")
def test_training_forward_and_backward_make_no_host_sync(corpus_dir):
    """One training step of a family SAE (forward, auxiliary loss with dead latents, threshold
    update, backward) queues on the GPU without waiting for it."""
    from sae_lens.saes.sae import TrainStepInput

    from core.pipeline.training import build_training_saes

    cfg = TrainConfig(corpus_dir=corpus_dir, widths=(64,), k=4.0,
                      hook_name="blocks.0.hook_resid_post", context_size=16)
    sae = build_training_saes(cfg, 16, "cuda")["w64"]
    dead = torch.zeros(64, dtype=torch.bool, device="cuda")
    dead[:10] = True
    step = TrainStepInput(sae_in=torch.randn(32, 16, device="cuda"), coefficients={},
                          dead_neuron_mask=dead, n_training_steps=0,
                          is_logging_step=False)
    sae.training_forward_pass(step)  # warm-up: first calls may allocate and sync
    torch.cuda.set_sync_debug_mode("error")
    try:
        sae.training_forward_pass(step).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
