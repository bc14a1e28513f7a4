"""Feature maps: one row per latent, lineage, refusals, persistence, and the page (AppTest)."""

from __future__ import annotations

import json
import os

import duckdb
import numpy as np
import pandas as pd
import pytest
import torch
from streamlit.testing.v1 import AppTest

from core import maps
from core.feature_index import EMBEDDED_INDEX, FeatureIndex
from core.maps import (
    FeatureMap,
    MapConfig,
    Member,
    cluster_table,
    compute_map,
    lineage_tree,
)
from core.map_store import load_map, save_map
from core.saes import SaeSpec, embedded_saes, load_sae
from tests.conftest import ROOT, build_sae, make_index, tiny_page

HOOK = "blocks.1.hook_resid_post"
# UMAP's numba code compiles once into this ignored folder, not once per temporary cache dir.
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / ".pytest_cache" / "numba"))
FAST = MapConfig(n_epochs=30, cluster_dims=4)


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    return tmp_path


def unit(n: int, d: int = 32, seed: int = 0) -> np.ndarray:
    g = np.random.default_rng(seed)
    w = g.standard_normal((n, d)).astype(np.float32)
    return w / np.linalg.norm(w, axis=1, keepdims=True)


def family(*widths: int, hook: str = HOOK) -> dict[str, Member]:
    return {f"w{n}": Member(f"w{n}", unit(n, seed=n), hook) for n in widths}


def test_one_row_per_latent_and_lineage_is_brute_force_nearest(tiny_dir, gpt2):
    sae = load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), gpt2)  # 64 latents
    fam = {"w16": Member("w16", unit(16), HOOK), "w128": unit(128, seed=1), "l1": sae}
    fm = compute_map(fam, FAST)
    pts = fm.points
    assert len(pts) == 16 + 64 + 128
    assert [m["name"] for m in fm.members] == ["w16", "l1", "w128"]  # narrowest first
    for name, n in (("w16", 16), ("l1", 64), ("w128", 128)):
        assert sorted(pts.loc[pts["sae"] == name, "latent"]) == list(range(n))
        assert (pts.loc[pts["sae"] == name, "width"] == n).all()
    assert np.isfinite(pts[["x", "y"]].to_numpy()).all()
    assert pts[["x", "y"]].std().min() > 0  # a real layout, not a point
    assert pts["cluster"].min() >= -1 and pts["cluster"].max() >= 0
    assert fm.members[1]["spec"] == f"local:{tiny_dir / 'sae-gpt2-l1'}"
    lin = fm.lineage
    assert len(lin) == (16 + 64) * 3
    # lineage = top-3 decoder cosine in the next wider SAE, checked by brute force
    a = unit(16)
    b = torch.nn.functional.normalize(sae.sae.W_dec.float(), dim=1).numpy()
    cos = a @ b.T
    for i in (0, 7, 15):
        rows = lin[(lin["sae"] == "w16") & (lin["latent"] == i)].sort_values("rank")
        assert rows["child_sae"].eq("l1").all()
        assert list(rows["child_latent"]) == list(np.argsort(-cos[i])[:3])
        np.testing.assert_allclose(rows["cosine"], np.sort(cos[i])[::-1][:3], rtol=1e-5)


@pytest.mark.parametrize("coarse", [False, True])
def test_nearest_neighbours_are_exact(monkeypatch, coarse):
    """UMAP gets the exact cosine k-NN graph, also from bf16 candidates re-scored in fp32."""
    if coarse:
        monkeypatch.setattr(maps, "BF16_MIN_ELEMENTS", 0)
        monkeypatch.setattr(maps, "_fast_bf16", lambda: True)
    x = unit(700, 64, seed=9)
    x[3] = x[2]  # a duplicate direction still lists itself first
    idx, dist = maps._knn(torch.from_numpy(x), 15, "cosine")
    cos = x @ x.T
    np.fill_diagonal(cos, np.inf)
    want = np.argsort(-cos, axis=1, kind="stable")[:, :15]
    assert (idx[:, 0] == np.arange(700)).all() and (dist[:, 0] == 0).all()
    assert (idx[:, 1:] == want[:, 1:]).mean() > 0.999  # ties may swap
    np.fill_diagonal(cos, 1.0)
    np.testing.assert_allclose(dist, 1 - np.take_along_axis(cos, idx, 1), atol=1e-5)


def test_a_split_latent_finds_its_two_parts():
    wide = unit(64, seed=3)
    narrow = unit(24, seed=4)
    narrow[5] = wide[10] + wide[40]
    narrow[5] /= np.linalg.norm(narrow[5])
    wider = unit(160, seed=5)
    wider[100] = wide[10]  # w64 #10 continues unchanged one width up
    fm = compute_map({"narrow": narrow, "wide": wide, "wider": wider},
                     MapConfig(n_epochs=30, cluster=False))
    lin = fm.lineage
    first = lin[(lin["sae"] == "narrow") & (lin["latent"] == 5)].sort_values("rank")
    assert set(first["child_latent"][:2]) == {10, 40}
    assert first["cosine"].iloc[1] > first["cosine"].iloc[2] + 0.2
    tree = lineage_tree(fm, "narrow", 5, min_cosine=0.5, k=2)
    assert set(tree.loc[tree["depth"] == 1, "latent"]) == {10, 40}
    deep = tree[(tree["depth"] == 2) & (tree["parent_latent"] == 10)]
    assert deep.iloc[0]["latent"] == 100 and deep.iloc[0]["cosine"] == pytest.approx(1.0)
    ancestors = maps.parents(fm, "wide", 40)
    assert 5 in set(ancestors["latent"])
    assert (fm.points["cluster"] == -1).all()  # clustering off


def test_family_with_different_d_in_is_refused():
    fam = {"a": unit(40, 32), "b": unit(80, 48)}
    with pytest.raises(ValueError, match=r"differ in d_in \(a: 32, b: 48\).*same model and hook"):
        compute_map(fam, FAST)


def test_family_on_different_hooks_is_refused():
    fam = {"a": Member("a", unit(40), "blocks.1.hook_resid_post"),
           "b": Member("b", unit(80), "blocks.0.hook_resid_post")}
    with pytest.raises(ValueError, match="different hooks.*blocks.0.hook_resid_post.*same hook"):
        compute_map(fam, FAST)


def test_single_sae_gives_a_map_without_lineage():
    fm = compute_map({"only": unit(50)}, FAST)
    assert len(fm.points) == 50 and fm.lineage.empty
    assert lineage_tree(fm, "only", 3).empty


def test_too_few_latents_for_n_neighbors():
    with pytest.raises(ValueError, match=r"has 12 latents; UMAP with n_neighbors=15 needs more"
                                         r".*lower n_neighbors below 12"):
        compute_map({"a": unit(4), "b": unit(8)}, MapConfig())


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"n_neighbors": 1}, "n_neighbors=1: use an integer of at least 2"),
    ({"min_dist": 1.5}, "min_dist=1.5: use a value between 0 and 1"),
    ({"min_cluster_size": 1}, "min_cluster_size=1"),
    ({"n_epochs": 3}, "n_epochs=3: use None"),
    ({"metric": "manhattan"}, "metric='manhattan': use 'cosine' or 'euclidean'"),
])
def test_config_checks_quote_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MapConfig(**kwargs)


def test_lineage_tree_checks_its_latent():
    fm = compute_map(family(16, 32), FAST)
    with pytest.raises(ValueError, match="Latent 16 is out of range: w16 has latents 0 to 15"):
        lineage_tree(fm, "w16", 16)
    with pytest.raises(ValueError, match="no SAE 'w8'"):
        lineage_tree(fm, "w8", 0)


def test_stored_map_loads_without_recomputing(cache, monkeypatch):
    fam = family(16, 48)
    first = compute_map(fam, FAST)
    assert first.source == "computed"
    save_map(first)

    def fail(*args, **kwargs):
        raise AssertionError("UMAP ran again")

    monkeypatch.setattr(maps, "_umap", fail)
    again = load_map(list(fam.values()), FAST)
    assert again.source == str(cache / "index" / "maps.duckdb")
    pd.testing.assert_frame_equal(again.points, first.points, check_dtype=False)
    pd.testing.assert_frame_equal(again.lineage.reset_index(drop=True),
                                  first.lineage.sort_values(["sae", "latent", "rank"])
                                  .reset_index(drop=True), check_dtype=False)
    assert again.members == first.members
    # other parameters, or other weights under the same names, are other maps
    assert load_map(list(fam.values()), MapConfig(n_epochs=30, cluster_dims=4, seed=1)) is None
    changed = family(16, 48)
    changed["w16"].w_dec[0] *= -1
    assert load_map(list(changed.values()), FAST) is None


def test_failed_write_leaves_no_half_map(cache):
    fm = compute_map(family(16, 48), FAST)
    broken = FeatureMap(fm.family_key, fm.config, fm.members, fm.points,
                        fm.lineage.assign(cosine="not a number"), fm.seconds)
    path = cache / "maps.duckdb"
    with pytest.raises(duckdb.Error):
        save_map(broken, path)  # fails after the points were inserted
    assert load_map(fm.family_key, fm.config, [path]) is None
    save_map(fm, path)
    with pytest.raises(duckdb.Error):
        save_map(broken, path)  # replacing a stored map fails: the old one stays whole
    kept = load_map(fm.family_key, fm.config, [path])
    assert len(kept.points) == 64 and len(kept.lineage) == 16 * 3
    con = duckdb.connect(str(path), read_only=True)
    assert con.execute("SELECT count(*) FROM map_points").fetchone()[0] == 64
    con.close()


def test_release_siblings_are_the_widths_at_one_site():
    """Read from sae_lens's directory, which ships with sae_lens (no network)."""
    ids = maps.release_siblings("gpt2-small-res-jb-feature-splitting",
                                "blocks.8.hook_resid_pre_3072")
    assert ids[0] == "blocks.8.hook_resid_pre_768" and len(ids) == 8
    assert ids[-1] == "blocks.8.hook_resid_pre_98304"
    scope = maps.release_siblings("gemma-scope-2-270m-pt-res", "layer_12_width_16k_l0_medium")
    assert scope == [f"layer_12_width_{w}_l0_medium" for w in ("16k", "65k", "262k", "1m")]
    assert maps.release_siblings("gpt2-small-res-jb", "blocks.8.hook_resid_pre") == [
        "blocks.8.hook_resid_pre"]
    with pytest.raises(ValueError, match="has no sae_id 'nope'"):
        maps.release_siblings("gpt2-small-res-jb", "nope")


def test_too_many_latents_are_refused(monkeypatch):
    monkeypatch.setattr(maps, "MAX_LATENTS", 100)
    with pytest.raises(ValueError, match="has 120 latents; maps here handle up to 100.*widest"):
        compute_map(family(40, 80), FAST)


def test_labels_are_attached_per_sae():
    pts = pd.DataFrame({"sae": ["a", "a", "b"], "latent": [0, 1, 0], "label": ["", "", ""]})
    out = maps.attach_labels(pts, {"a": {1: "fox"}, "b": {}, "c": {0: "x"}})
    assert list(out["label"]) == ["", "fox", ""]
    assert list(pts["label"]) == ["", "", ""]  # the stored points are left alone


def test_cluster_table_counts_widths_and_tokens():
    pts = pd.DataFrame({
        "sae": ["a", "a", "b", "b", "b", "b"], "width": [2, 2, 4, 4, 4, 4],
        "latent": [0, 1, 0, 1, 2, 3], "x": 0.0, "y": 0.0, "cluster": [0, -1, 0, 0, 1, 1],
        "top_tokens": ["Paris · France", "", "Paris", "Lyon · Paris", "def", "def · return"],
        "firing_rate": [0.1, 0.2, 0.3, 0.5, 0.0, 0.0], "label": "",
    })
    fm = FeatureMap("k", MapConfig(), [{"name": "a"}, {"name": "b"}], pts, pd.DataFrame(), 0.0)
    table = cluster_table(fm)
    assert list(table["cluster"]) == [0, 1]  # spanning two widths first
    first = table.iloc[0]
    assert first["size"] == 3 and first["widths"] == "a×1, b×2"
    assert first["common_tokens"].startswith("Paris (3)")
    assert first["mean_firing_rate"] == pytest.approx(0.3)


def test_embedded_family_reads_weights_and_shipped_map():
    shipped = embedded_saes()
    if not shipped:
        pytest.skip("no embedded family in data/saes")
    with pytest.raises(ValueError, match="No embedded SAE named 'w3'"):
        maps.embedded_family(["w3"])
    fam = maps.embedded_family(hover=False)
    assert [m.hook for m in fam.values()] == ["blocks.12.hook_resid_post"] * len(shipped)
    fm = load_map(list(fam.values()), MapConfig(), [EMBEDDED_INDEX])
    assert fm is not None, "No default map in the shipped index: run `python -m core.map_store`."
    assert len(fm.points) == sum(m.d_sae for m in fam.values())
    assert fm.points["top_tokens"].str.len().gt(0).all()
    assert len(FeatureIndex(EMBEDDED_INDEX).saes) == len(shipped)  # the index still opens


# --- the page ----------------------------------------------------------------------------------


def page(tiny_dir) -> AppTest:
    return tiny_page(tiny_dir, "maps", timeout=180)


@pytest.fixture()
def tiny_family(tiny_dir, tmp_path) -> list[str]:
    lines = [f"local:{tiny_dir / 'sae-gpt2-l1'}"]
    for n in (128, 256):
        build_sae(32, n, HOOK, "tiny-gpt2").save_model(tmp_path / f"sae-{n}")
        lines.append(f"local:{tmp_path / f'sae-{n}'}")
    return lines


def test_page_computes_stores_and_reloads_a_map(tiny_dir, cache, tiny_family):
    from core.labels import Explanation, LabelStore
    from ui.resources import label_store

    make_index(tiny_dir)  # the sidebar's SAE gets an index: automatic labels
    scope = LabelStore.scope("tiny-gpt2", SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")))
    label_store().set(scope, 3, "my fox latent")
    label_store().put(scope, [
        Explanation(4, "patchscope", "a small animal", None, {"norm": 20.0}),
        Explanation(4, "autointerp", "the word <b>fox</b>", 0.83, {"explainer": "m"}),
        Explanation(4, "autointerp", "animals", 0.5, {"explainer": "n"})])
    at = page(tiny_dir)
    assert not at.exception, at.exception
    assert at.radio(key="map_source").value == "list"  # not the embedded model
    assert at.text_area(key="map_family").value == tiny_family[0]  # the sidebar's SAE
    at.text_area(key="map_family").set_value("\n".join(tiny_family))
    at.number_input(key="map_epochs").set_value(50).run()
    assert any("448 latents" in i.value for i in at.info)
    at.button(key="map_compute").click().run()
    assert not at.exception, at.exception
    assert not at.error, [e.value for e in at.error]
    assert at.get("plotly_chart"), "no map drawn"
    assert any("448 latents from sae-gpt2-l1, sae-128, sae-256" in c.value for c in at.caption)
    # lineage of the narrowest SAE's latent 0, and the cluster table
    assert at.selectbox(key="map_lin_sae").value == "sae-gpt2-l1"
    at.slider(key="map_lin_min").set_value(0.0).run()
    frames = [d.value for d in at.dataframe]
    tree = next(f for f in frames if "parent_sae" in f.columns)
    assert set(tree["sae"]) == {"sae-128", "sae-256"} and (tree["depth"].max() == 2)
    assert any("common_tokens" in f.columns for f in frames)
    points = next(f for f in frames if "x" in f.columns and "label" in f.columns)
    labelled = points[points["sae"] == "sae-gpt2-l1"].set_index("latent")["label"]
    assert labelled[3] == "your label: my fox latent"
    assert labelled[4] == "autointerp 0.83: the word <b>fox</b>"  # the best-scored one
    assert "best explanation" in tree.columns
    hovers = [t for trace in json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
              for t in trace.get("hovertext") or []]
    assert any("autointerp 0.83: the word &lt;b&gt;fox&lt;/b&gt;" in t for t in hovers)
    assert not any("<b>fox" in t for t in hovers)  # LLM text is escaped in the hover
    assert (labelled.str.startswith("fires on: ")).sum() > 5  # + automatic ones
    assert (points.loc[points["sae"] != "sae-gpt2-l1", "label"] == "").all()  # no index

    # a new session finds the stored map: no compute button
    again = page(tiny_dir)
    again.text_area(key="map_family").set_value("\n".join(tiny_family))
    again.number_input(key="map_epochs").set_value(50).run()
    assert not again.exception
    assert any("from the cache" in c.value for c in again.caption)
    assert not [b for b in again.button if b.key == "map_compute"]

    # open a latent of another width in Lookup: that SAE is loaded in the sidebar
    again.selectbox(key="map_lin_sae").set_value("sae-128").run()
    again.number_input(key="map_lin_latent").set_value(7).run()
    again.button(key="map_open").click().run()
    assert not again.exception, again.exception
    assert any(t.value == "Feature lookup" for t in again.title)
    assert again.session_state["sae"].spec.name == tiny_family[1].removeprefix("local:")
    assert again.query_params["latent"] == "7"


def test_page_refuses_a_family_on_two_hooks(tiny_dir, cache, tiny_family, tmp_path):
    build_sae(32, 96, "blocks.0.hook_resid_post", "tiny-gpt2").save_model(tmp_path / "l0")
    at = page(tiny_dir)
    at.text_area(key="map_family").set_value(f"{tiny_family[0]}\nlocal:{tmp_path / 'l0'}").run()
    assert not at.exception
    assert any("different hooks" in e.value for e in at.error)


def test_page_single_sae_and_too_few_latents(tiny_dir, cache):
    at = page(tiny_dir)
    at.number_input(key="map_n_neighbors").set_value(100).run()
    at.button(key="map_compute").click().run()
    assert not at.exception
    assert any("has 64 latents; UMAP with n_neighbors=100" in e.value for e in at.error)
    at.number_input(key="map_n_neighbors").set_value(15)
    at.number_input(key="map_epochs").set_value(50).run()
    at.button(key="map_compute").click().run()
    assert not at.exception, at.exception
    assert any("One SAE: a map without lineage" in i.value for i in at.info)
    assert at.get("plotly_chart")
