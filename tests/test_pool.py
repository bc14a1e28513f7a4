"""The server's bounded pool of models and the rule for what a link may load."""

from __future__ import annotations

import threading

import pytest

from core.models import ModelSpec
from core.pool import (
    ModelPool,
    check_link_path,
    link_may_load_model,
    link_may_load_sae,
    model_key,
)
from core.saes import SaeSpec


class Fake:
    def __init__(self, spec):
        self.spec, self.name = spec, spec.name


def test_pool_is_bounded_and_drops_the_least_recently_used():
    loads = []
    pool = ModelPool(limit=2, loader=lambda spec: loads.append(spec.name) or Fake(spec),
                     sae_loader=lambda spec, lm: ("sae", spec.name))
    a, b, c = (ModelSpec("hub", n, device="cpu") for n in "abc")
    pool.model(a)
    pool.model(b)
    pool.model(a)  # held: not loaded again, and now the most recent
    pool.model(c)  # b goes
    assert loads == ["a", "b", "c"]
    assert [m.name for m in pool.held()] == ["c", "a"]
    assert not pool.holds(b) and pool.get(b) is None


def test_dtype_auto_and_its_resolution_are_one_model():
    pool = ModelPool(limit=2, loader=Fake)
    pool.model(ModelSpec("hub", "m", device="cpu"))
    assert pool.holds(ModelSpec("hub", "m", device="cpu", dtype="float32"))
    assert not pool.holds(ModelSpec("hub", "m", device="cpu", dtype="bfloat16"))
    assert model_key(ModelSpec("hub", "m", device="cpu")) == ("hub", "m", "cpu", "float32")


def test_one_load_per_model_when_sessions_ask_at_once():
    started, loads = threading.Event(), []

    def slow(spec):
        loads.append(spec.name)
        started.wait(2)
        return Fake(spec)

    pool = ModelPool(limit=2, loader=slow)
    spec = ModelSpec("hub", "m", device="cpu")
    threads = [threading.Thread(target=pool.model, args=(spec,)) for _ in range(4)]
    for t in threads:
        t.start()
    started.set()
    for t in threads:
        t.join(10)
    assert loads == ["m"]


def test_saes_are_held_per_model_and_keyed_by_full_path(tmp_path):
    pool = ModelPool(limit=1, loader=Fake, sae_loader=lambda spec, lm: object())
    spec = ModelSpec("hub", "m", device="cpu")
    lm = pool.model(spec)
    first = pool.sae(lm, SaeSpec("local", str(tmp_path / "a" / "layer6")))
    assert pool.sae(lm, SaeSpec("local", str(tmp_path / "a" / "layer6"))) is first
    assert pool.sae(lm, SaeSpec("local", str(tmp_path / "b" / "layer6"))) is not first
    assert pool.holds_sae(spec, SaeSpec("local", str(tmp_path / "a/../a/layer6")))


def test_what_a_link_may_load():
    pool = ModelPool(limit=2, loader=Fake, sae_loader=lambda spec, lm: object())
    default = ModelSpec("embedded")
    other = ModelSpec("hub", "gpt2", device="cpu")
    assert link_may_load_model(pool, ModelSpec("embedded", dtype="auto"), default)
    assert not link_may_load_model(pool, other, default)
    pool.model(other)
    assert link_may_load_model(pool, other, default)
    release = SaeSpec("release", "gpt2-small-res-jb", "blocks.8.hook_resid_pre")
    assert link_may_load_sae(pool, other, None, None)
    assert link_may_load_sae(pool, other, SaeSpec("embedded", "w512"), None)
    assert not link_may_load_sae(pool, other, release, None)
    assert link_may_load_sae(pool, other, release, release)  # the operator's default


def test_local_paths_in_links_only_under_allowed_dirs(tmp_path, monkeypatch):
    monkeypatch.delenv("SAE_WORKBENCH_ALLOWED_DIRS", raising=False)
    with pytest.raises(ValueError, match="none is listed"):
        check_link_path(str(tmp_path), "model")
    monkeypatch.setenv("SAE_WORKBENCH_ALLOWED_DIRS", str(tmp_path / "models"))
    check_link_path(str(tmp_path / "models" / "llama"), "model")
    for bad in (tmp_path / "other", tmp_path / "models" / ".." / "secrets", tmp_path / "models2"):
        with pytest.raises(ValueError, match="is refused: local paths in links must lie under"):
            check_link_path(str(bad), "sae")
