"""Evaluation metrics on SAEs whose answers are known: a perfect one and an all-zero one."""

from __future__ import annotations

import json

import pytest
import torch

from core.pipeline.evaluation import evaluate_family
from core.density import DEAD_LOG10
from core.saes import SaeSpec, load_sae
from tests.conftest import CORPUS, build_sae

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture()
def heldout(tmp_path):
    path = tmp_path / "heldout.jsonl"
    path.write_text("\n".join(json.dumps({"text": CORPUS[i:] + CORPUS[:i]})
                              for i in range(0, 200, 9)) + "\n")
    return path


def saved(sae, path, gemma3):
    sae.save_model(path)
    return load_sae(SaeSpec("local", str(path)), gemma3)


def test_perfect_and_zero_saes(gemma3, heldout, tmp_path):
    d = gemma3.d_model
    perfect = build_sae(d, 2 * d, HOOK, "tiny-gemma3")
    zero = build_sae(d, 8, HOOK, "tiny-gemma3")
    with torch.no_grad():  # ReLU(x) - ReLU(-x) = x
        eye = torch.eye(d)
        perfect.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        perfect.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        zero.W_enc.zero_()
        zero.W_dec.zero_()
    saes = {"perfect": saved(perfect, tmp_path / "p", gemma3),
            "zero": saved(zero, tmp_path / "z", gemma3)}
    results = {m.name: m for m in evaluate_family(gemma3, saes, heldout, context_size=16,
                                                  max_tokens=600, ce_tokens=300)}
    p, z = results["perfect"], results["zero"]
    assert p.fve == pytest.approx(1.0, abs=1e-4)
    assert p.ce_spliced == pytest.approx(p.ce_clean, abs=1e-4)
    assert p.ce_recovered == pytest.approx(1.0, abs=1e-3)
    assert p.l0 == pytest.approx(d, rel=0.05)  # every coordinate is non-zero once
    assert z.fve <= 0.0  # a zero reconstruction explains nothing (less, when x has a mean)
    assert z.ce_spliced == pytest.approx(z.ce_zero, abs=1e-4)
    assert z.ce_recovered == pytest.approx(0.0, abs=1e-3)
    assert z.l0 == 0 and z.dead_fraction == 1.0 and set(z.log10_density) == {DEAD_LOG10}
    assert p.tokens == z.tokens >= 500  # BOS positions are not counted
