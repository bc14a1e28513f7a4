"""The shipped SAE family on the real embedded model (slow)."""

from __future__ import annotations

import json

import pytest

from core.pipeline.evaluation import reconstruction_stats
from core.feature_index import EMBEDDED_INDEX, FeatureIndex
from core.models import ModelSpec, load_model
from core.saes import EMBEDDED_SAE_DIR, SaeSpec, embedded_saes, load_sae
from core.text import windows

pytestmark = pytest.mark.slow
WIDTHS = {"w512": 512, "w1024": 1024, "w2048": 2048, "w4096": 4096}


@pytest.fixture(scope="module")
def gemma():
    return load_model(ModelSpec("embedded", device="cpu"))


@pytest.fixture(scope="module")
def family(gemma):
    return {name: load_sae(SaeSpec("embedded", name), gemma) for name in embedded_saes()}


def test_family_is_shipped_and_fits_the_model(gemma, family):
    assert {n: s.d_sae for n, s in family.items()} == WIDTHS
    for s in family.values():
        assert s.d_in == gemma.d_model == 640
        assert s.hook_name == "blocks.12.hook_resid_post"
        assert s.warnings == []


def test_fve_on_heldout_sample_matches_the_card(gemma, family):
    card = {r["name"]: r for r in json.loads(
        (EMBEDDED_SAE_DIR / "metrics.json").read_text())["results"]}
    lines = (EMBEDDED_SAE_DIR / "heldout_sample.jsonl").read_text().splitlines()
    texts = [json.loads(line)["text"] for line in lines]
    import torch

    ids = torch.tensor(list(windows(gemma, iter(texts), 128))[:64])
    stats = reconstruction_stats(gemma, family, ids)
    for name, s in stats.items():
        assert s["fve"] == pytest.approx(card[name]["fve"], abs=0.05), name
        assert s["l0"] == pytest.approx(card[name]["l0"], rel=0.35), name


def test_shipped_index_covers_the_family(family):
    index = FeatureIndex(EMBEDDED_INDEX)
    assert set(index.saes) == set(WIDTHS)
    for name, s in family.items():
        assert index.d_sae(name) == s.d_sae
        data = index.latent(name, index.alive_latents(name, with_examples=True)[0])
        assert data.top and data.top[0].value == pytest.approx(data.max_act)
