"""Patch scoping on the real embedded model (slow): the placeholder is Gemma's one <unk> token, and
at an early layer the patched vector's norm changes the answer."""

from __future__ import annotations

import pytest

from core.models import ModelSpec, load_model
from core.patch_scoping import PLACEHOLDER, ScopeConfig, patch_scope, prompt_with_positions
from core.saes import SaeSpec, embedded_saes, load_sae
from tests.conftest import leftover_hooks

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def gemma():
    return load_model(ModelSpec("embedded", device="cpu"))


def test_patch_scoping_on_the_embedded_model(gemma):
    sae = load_sae(SaeSpec("embedded", embedded_saes()[-1]), gemma)
    cfg = ScopeConfig(norms=(1.0,), max_new_tokens=8)
    ids, positions = prompt_with_positions(gemma, cfg)
    assert len(positions) == 1 and gemma.tokenizer.decode([ids[positions[0]]]) == PLACEHOLDER
    early = ScopeConfig(hook="blocks.4.hook_resid_post", norms=(1e-3, 2000.0), max_new_tokens=8)
    res = patch_scope(gemma, sae, 0, early)
    assert res.raw[0] != res.raw[1]  # a vector of the residual's size changes the answer
    assert leftover_hooks(gemma.model) == []
