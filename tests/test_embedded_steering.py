"""Steering the real embedded model with the starter recipe (slow)."""

from __future__ import annotations

import re

import pytest

from core.feature_index import EMBEDDED_INDEX, FeatureIndex
from core.models import ModelSpec, load_model
from core.saes import SaeSpec, load_sae
from core.steering import GenConfig, generate_steered
from ui.steering_view import STARTER, STARTER_PROMPT, STARTER_SAE

pytestmark = pytest.mark.slow
PROMPTS = [STARTER_PROMPT, "The weather today is", "My grandfather told me a story about"]


@pytest.fixture(scope="module")
def gemma():
    return load_model(ModelSpec("embedded", device="cpu"))


def test_starter_latent_is_about_small_things(gemma):
    latent = STARTER.interventions[0].latent
    data = FeatureIndex(EMBEDDED_INDEX).latent(STARTER_SAE, latent)
    top = [gemma.tokenizer.decode([t]).strip().lower() for t, _ in data.logit_pos[:6]]
    assert top.count("small") >= 3, top
    assert STARTER.interventions[0].value <= 1.0 * data.max_act  # within the observed range


def test_clamping_the_starter_latent_brings_its_tokens(gemma):
    sae = load_sae(SaeSpec("embedded", STARTER_SAE), gemma)
    word = re.compile(r"\b(small|smaller|smallest|tiny|little)\b", re.IGNORECASE)
    base = steered = 0
    for seed, prompt in enumerate(PROMPTS):
        res = generate_steered(gemma, sae, prompt, [None, STARTER],
                               GenConfig(max_new_tokens=32, temperature=0.7, seed=seed))
        base += len(word.findall(res.texts[0]))
        steered += len(word.findall(res.texts[1]))
    assert steered >= 6 and steered >= 4 * max(base, 1), (base, steered)
