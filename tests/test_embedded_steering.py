"""Steering the real embedded model with the starter recipe (slow)."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from core.feature_index import EMBEDDED_INDEX, FeatureIndex
from core.models import ModelSpec, load_model
from core.saes import SaeSpec, load_sae
from core.steering import GenConfig, generate_steered
from ui.steering_view import STARTER, STARTER_PROMPT, STARTER_SAE, STARTER_WORDS

pytestmark = pytest.mark.slow
PROMPTS = [STARTER_PROMPT, "The weather today is", "My grandfather told me a story about"]


@pytest.fixture(scope="module")
def gemma():
    return load_model(ModelSpec("embedded", device="cpu"))


def test_starter_latent_is_about_family(gemma):
    latent = STARTER.interventions[0].latent
    data = FeatureIndex(EMBEDDED_INDEX).latent(STARTER_SAE, latent)
    top = [gemma.tokenizer.decode([t]).strip().lower() for t, _ in data.logit_pos[:10]]
    assert sum(t.startswith("famil") for t in top) >= 3, top
    assert STARTER.interventions[0].value <= 3.0 * data.max_act  # within the clamp slider's range


def test_clamping_the_starter_latent_brings_its_tokens(gemma):
    sae = load_sae(SaeSpec("embedded", STARTER_SAE), gemma)
    word = re.compile(STARTER_WORDS, re.IGNORECASE)
    base = steered = 0
    for seed, prompt in enumerate(PROMPTS):
        res = generate_steered(gemma, sae, prompt, [None, STARTER],
                               GenConfig(max_new_tokens=32, temperature=0.7, seed=seed))
        base += len(word.findall(res.texts[0]))
        steered += len(word.findall(res.texts[1]))
        words = re.findall(r"\w+", res.texts[1].lower())
        print(f"{prompt!r} steered: {res.texts[1]!r}")
        # readable, not one word over and over
        assert Counter(words).most_common(1)[0][1] < 0.4 * len(words), res.texts[1]
    print(f"family words in 3 x 32 sampled tokens: baseline {base}, steered {steered}")
    assert steered >= 6 and steered >= 4 * max(base, 1), (base, steered)
