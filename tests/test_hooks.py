"""Hook points: equal to TransformerLens on GPT-2, consistent on Gemma 3, safe when shared."""

from __future__ import annotations

import threading

import pytest
import torch

from core.hooks import HOOK_KINDS, capture, family, forward, hooked, resolve_hook, run_to_hooks
from core.saes import SaeSpec, load_sae, sae_input
from core.text import tokenize
from tests.conftest import build_sae, leftover_hooks

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b): return a"]


def supported_hook_names(model: torch.nn.Module) -> list[str]:
    family(model)  # refuses a model family the hooks do not know
    n_layers = int(model.config.num_hidden_layers)
    return [f"blocks.{layer}.{kind}" for layer in range(n_layers) for kind in HOOK_KINDS]


def tl_model(hf_model, process: bool):
    """A TransformerLens GPT-2 with the same weights, processed as from_pretrained does."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
        d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, n_ctx=c.n_positions, act_fn="gelu_new",
        normalization_type="LN", eps=c.layer_norm_epsilon, original_architecture="GPT2LMHeadModel",
        positional_embedding_type="standard", device="cpu",
    )
    model = HookedTransformer(cfg)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf_model, cfg), fold_ln=process, center_writing_weights=process,
        center_unembed=process, fold_value_biases=process,
    )
    return model.eval()


def our_acts(lm, names, batch):
    with capture(lm, names) as store:
        forward(lm, batch.input_ids, batch.attention_mask)
    return dict(store)


@pytest.mark.parametrize("process", [False, True], ids=["no_processing", "from_pretrained"])
def test_gpt2_hooks_equal_transformer_lens(gpt2, process):
    batch = tokenize(gpt2, TEXTS[:1])
    tl = tl_model(gpt2.model, process)
    names = [n for n in supported_hook_names(gpt2.model) if not (process and n.endswith("hook_z"))]
    ours = our_acts(gpt2, names, batch)
    _, cache = tl.run_with_cache(batch.input_ids)
    assert len(names) == 2 * 5 - (2 if process else 0)
    for name in names:
        expected = cache[name]
        got = ours[name]
        if name.endswith("hook_z"):
            expected = expected.flatten(-2)
        if process:  # TransformerLens centred every write: the documented processing does too
            got = got - got.mean(-1, keepdim=True)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4, msg=name)


def test_centering_sae_reads_transformer_lens_stream(gpt2, tiny_dir, tmp_path):
    """An SAE trained on a processed TransformerLens model encodes the same via the HF model."""
    hook = "blocks.1.hook_resid_pre"
    sae = build_sae(32, 16, hook, "tiny-gpt2",
                    model_from_pretrained_kwargs={"center_writing_weights": True})
    sae.save_model(tmp_path / "sae")
    loaded = load_sae(SaeSpec("local", str(tmp_path / "sae")), gpt2)
    assert loaded.processing.center and loaded.processing.prepend_bos
    batch = tokenize(gpt2, TEXTS[:1])
    _, cache = tl_model(gpt2.model, True).run_with_cache(batch.input_ids)
    ours = our_acts(gpt2, [hook], batch)[hook]
    torch.testing.assert_close(loaded.encode(ours), sae.encode(cache[hook]), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(sae.encode(ours), sae.encode(cache[hook]), atol=1e-3)


@pytest.mark.parametrize("fixture", ["gpt2", "gemma3"])
def test_hook_sites_compose_to_the_logits(request, fixture):
    """resid_post = resid_pre + attn_out + mlp_out; resid_post(L) = resid_pre(L+1); the last
    resid_post through the final norm and unembedding gives the model's logits."""
    lm = request.getfixturevalue(fixture)
    batch = tokenize(lm, TEXTS)
    names = supported_hook_names(lm.model)
    with capture(lm, names) as acts:
        logits = forward(lm, batch.input_ids, batch.attention_mask).logits
    for layer in range(lm.n_layers):
        pre, post = acts[f"blocks.{layer}.hook_resid_pre"], acts[f"blocks.{layer}.hook_resid_post"]
        writes = acts[f"blocks.{layer}.hook_attn_out"] + acts[f"blocks.{layer}.hook_mlp_out"]
        torch.testing.assert_close(post, pre + writes, atol=1e-5, rtol=1e-5)
        if layer + 1 < lm.n_layers:
            torch.testing.assert_close(post, acts[f"blocks.{layer + 1}.hook_resid_pre"])
    final_norm = lm.model.get_submodule("transformer.ln_f" if fixture == "gpt2" else "model.norm")
    last = acts[f"blocks.{lm.n_layers - 1}.hook_resid_post"]
    torch.testing.assert_close(lm.model.lm_head(final_norm(last)), logits, atol=1e-4, rtol=1e-4)
    z = acts["blocks.0.attn.hook_z"]
    assert z.shape[-1] == lm.config.num_attention_heads * (
        getattr(lm.config, "head_dim", None) or lm.d_model // lm.config.num_attention_heads
    )


def test_edit_changes_output_and_identity_edit_does_not(gemma3):
    batch = tokenize(gemma3, TEXTS)
    base = forward(gemma3, batch.input_ids, batch.attention_mask).logits
    with hooked(gemma3, {"blocks.1.hook_resid_post": lambda a: a.clone()}):
        same = forward(gemma3, batch.input_ids, batch.attention_mask).logits
    with hooked(gemma3, {"blocks.1.hook_resid_post": lambda a: a + 5.0}):
        steered = forward(gemma3, batch.input_ids, batch.attention_mask).logits
    with hooked(gemma3, {"blocks.1.hook_resid_pre": lambda a: a * 0}):
        ablated = forward(gemma3, batch.input_ids, batch.attention_mask).logits
    torch.testing.assert_close(same, base)
    assert (steered - base).abs().max() > 1e-2
    assert (ablated - base).abs().max() > 1e-2
    assert leftover_hooks(gemma3.model) == []


def test_run_to_hooks_stops_early_and_matches_full_pass(gpt2):
    batch = tokenize(gpt2, TEXTS)
    full = our_acts(gpt2, ["blocks.0.hook_resid_post"], batch)
    calls = []
    handle = gpt2.model.transformer.h[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        early = run_to_hooks(gpt2, ["blocks.0.hook_resid_post"], batch.input_ids,
                             batch.attention_mask)
    finally:
        handle.remove()
    assert calls == []
    torch.testing.assert_close(early["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"])
    assert leftover_hooks(gpt2.model) == []


def test_no_hook_remains_after_exception(gpt2):
    batch = tokenize(gpt2, TEXTS)
    with pytest.raises(RuntimeError, match="boom"):
        with hooked(gpt2, {"blocks.0.hook_resid_pre": lambda a: a + 1,
                           "blocks.1.hook_mlp_out": lambda a: None}):
            assert len(leftover_hooks(gpt2.model)) == 2
            forward(gpt2, batch.input_ids)
            raise RuntimeError("boom")
    assert leftover_hooks(gpt2.model) == []

    def failing_hook(act):
        raise RuntimeError("inside the hook")

    with pytest.raises(RuntimeError, match="inside the hook"):
        with hooked(gpt2, {"blocks.0.hook_resid_post": failing_hook}):
            forward(gpt2, batch.input_ids)
    assert leftover_hooks(gpt2.model) == []
    assert not gpt2.lock._is_owned()


def test_two_threads_one_steered_unsteered_equals_solo(gemma3):
    """A steered session and an unsteered one at the same time: the unsteered sees no steering."""
    batch = tokenize(gemma3, TEXTS)
    solo = forward(gemma3, batch.input_ids, batch.attention_mask).logits
    inside, release = threading.Event(), threading.Event()
    results: dict[str, torch.Tensor] = {}
    errors: list[BaseException] = []

    def steered():
        try:
            with hooked(gemma3, {"blocks.0.hook_resid_post": lambda a: a + 3.0}):
                inside.set()
                release.wait(10)
                results["steered"] = forward(gemma3, batch.input_ids, batch.attention_mask).logits
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    def unsteered_locked():
        results["locked"] = forward(gemma3, batch.input_ids, batch.attention_mask).logits

    def unsteered_raw():  # skips the lock on purpose: hooks must still ignore other threads
        with torch.no_grad():
            results["raw"] = gemma3.model(input_ids=batch.input_ids,
                                          attention_mask=batch.attention_mask).logits

    a = threading.Thread(target=steered)
    a.start()
    assert inside.wait(10)
    raw = threading.Thread(target=unsteered_raw)
    raw.start()
    raw.join(10)
    locked = threading.Thread(target=unsteered_locked)
    locked.start()
    locked.join(0.3)
    assert locked.is_alive(), "an unsteered pass must wait while hooks are installed"
    release.set()
    a.join(10)
    locked.join(10)
    assert not errors
    torch.testing.assert_close(results["raw"], solo)
    torch.testing.assert_close(results["locked"], solo)
    assert (results["steered"] - solo).abs().max() > 1e-2
    assert leftover_hooks(gemma3.model) == []


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("blocks.9.hook_resid_post", "model has 2 layers"),
        ("blocks.0.hook_resid_mid", "Unsupported hook name"),
        ("blocks.0.hook_resid", "Unsupported hook name"),
        ("model.layers.0", "Unsupported hook name"),
    ],
)
def test_bad_hook_names_are_errors(gpt2, name, message):
    with pytest.raises(ValueError, match=message):
        resolve_hook(gpt2.model, name)


def test_hook_site_modules_found_by_name(gpt2, gemma3):
    assert resolve_hook(gpt2.model, "blocks.1.hook_attn_out").module == "transformer.h.1.attn"
    assert resolve_hook(gemma3.model, "blocks.2.hook_mlp_out").module == (
        "model.layers.2.post_feedforward_layernorm"
    )
    assert resolve_hook(gemma3.model, "blocks.0.hook_resid_pre").io == "input"


def test_sae_input_processing_is_identity_without_tl_kwargs(gpt2, tiny_dir):
    loaded = load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), gpt2)
    x = torch.randn(2, 3, 32)
    assert not loaded.processing.center
    torch.testing.assert_close(sae_input(loaded, x), x)
