"""The real embedded default (slow: converts the GGUF on first use, about a minute)."""

from __future__ import annotations

import pytest
import torch

from core.hooks import capture, forward
from core.models import EMBEDDED_MODEL_NAME, ModelSpec, load_model
from core.text import generate_text, tokenize
from tests.conftest import leftover_hooks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return load_model(ModelSpec("embedded", device="cpu"))


def test_embedded_model_shape(gemma):
    assert gemma.name == EMBEDDED_MODEL_NAME
    assert (gemma.n_layers, gemma.d_model, gemma.config.vocab_size) == (18, 640, 262144)
    assert gemma.architecture == "Gemma3ForCausalLM"


def test_knows_the_capital_of_france(gemma):
    """A text that reads as text: the check to run before trusting activations (a wrongly
    loaded GGUF produces garbage and every SAE trained on it is silently worthless)."""
    batch = tokenize(gemma, ["The capital of France is"])
    logits = forward(gemma, batch.input_ids).logits[0, -1]
    top3 = [gemma.tokenizer.decode([i]).strip() for i in logits.topk(3).indices.tolist()]
    assert "Paris" in top3
    answer = generate_text(gemma, ["Q: What is the capital of France?\nA:"], max_new_tokens=12)[0]
    assert "Paris" in answer


def test_batched_generation_with_padding_equals_unbatched(gemma):
    prompts = ["The capital of France is", "Q: What is the capital of France?\nA:",
               "def fibonacci(n):"]
    batched = generate_text(gemma, prompts, max_new_tokens=16)
    assert batched == [generate_text(gemma, [p], max_new_tokens=16)[0] for p in prompts]


def test_layer_12_resid_post_is_captured_without_leftovers(gemma):
    batch = tokenize(gemma, ["Sparse autoencoders on Gemma."])
    with capture(gemma, ["blocks.12.hook_resid_post"]) as acts:
        forward(gemma, batch.input_ids)
    act = acts["blocks.12.hook_resid_post"]
    assert act.shape == (1, batch.input_ids.shape[1], 640)
    assert torch.isfinite(act).all()
    assert leftover_hooks(gemma.model) == []
