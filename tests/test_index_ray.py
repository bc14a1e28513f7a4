"""The index build on Ray (local Ray, 2 workers) gives the index the single-process build gives,
also when a worker dies mid-build; partial statistics merge exactly."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import duckdb
import pytest
import torch

from core.index import IndexConfig, build_index
from core.index_stats import Running, _ShardAccumulator
from core.saes import SaeSpec, load_sae
from tests.conftest import INDEX_TEXTS, tiny_page

CFG = IndexConfig(context_size=16, max_tokens=600, top_k=5, n_sample=16, n_intervals=3,
                  per_interval=2, batch_windows=4, shard_windows=8, n_logits=4, n_neighbours=3)
TABLES = {"latents": "sae, latent", "top_examples": "sae, latent, rank",
          "interval_samples": "sae, latent, interval, token", "shown_spans": "sae, latent",
          "saes": "sae", "sequences": "seq"}


@pytest.fixture(scope="module")
def ray_local():
    import ray  # requirements.txt installs it for the tests: CI checks the equality

    from core.index_ray import init_local

    if ray.is_initialized():
        ray.shutdown()
    init_local(num_cpus=2, object_store_mb=200)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def sae(gpt2, tiny_dir):
    return load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), gpt2)


@pytest.fixture(scope="module")
def family(gpt2, sae, tmp_path_factory):
    """Two SAEs at two hooks (a family shares one forward pass), loadable by the workers."""
    from tests.conftest import build_sae

    where = tmp_path_factory.mktemp("topk") / "sae-gpt2-l0"
    build_sae(32, 48, "blocks.0.hook_resid_post", "tiny-gpt2", arch="topk").save_model(where)
    return {"s": sae, "t": load_sae(SaeSpec("local", str(where)), gpt2)}


@pytest.fixture(scope="module")
def single(gpt2, family, tmp_path_factory):
    return build_index(gpt2, family, INDEX_TEXTS, tmp_path_factory.mktemp("one") / "i.duckdb",
                       CFG)


def tables(path: Path) -> dict:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY {key}").df()
                for t, key in TABLES.items()}
    finally:
        con.close()


def assert_same_index(a: Path, b: Path) -> None:
    ta, tb = tables(a), tables(b)
    assert set(ta["saes"]["sae"]) == {"s", "t"}
    for name in TABLES:
        assert len(ta[name]) > 0, name
        assert ta[name].equals(tb[name]), f"table {name} differs"


def die_once(shard: int, marker: str, on_shard: int) -> None:
    """Run in a Ray worker before each shard: the first time ``on_shard`` comes, the worker's
    process exits (as a killed or crashed worker would)."""
    if shard == on_shard and not os.path.exists(marker):
        Path(marker).write_text(str(os.getpid()))
        os._exit(1)


def test_ray_build_equals_single_process_build(ray_local, gpt2, family, single, tmp_path):
    from core.index_ray import RayConfig

    messages = []
    out = build_index(gpt2, family, INDEX_TEXTS, tmp_path / "ray.duckdb", CFG,
                      ray=RayConfig(workers=2), progress=lambda f, m: messages.append((f, m)))
    assert_same_index(single, out)
    shards = [m for _, m in messages if "shards done on 2 CPU workers" in m]
    assert shards[-1].startswith("5 of 5 shards done")  # 40 windows, 8 per shard
    fractions = [f for f, _ in messages]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_killed_worker_is_retried_and_the_index_is_the_same(ray_local, gpt2, family, single,
                                                              tmp_path):
    from core.index_ray import RayConfig

    marker = tmp_path / "killed"
    out = build_index(gpt2, family, INDEX_TEXTS, tmp_path / "ray.duckdb", CFG,
                      progress=lambda f, m: None,
                      ray=RayConfig(workers=2, before_shard=functools.partial(
                          die_once, marker=str(marker), on_shard=2)))
    assert marker.exists() and int(marker.read_text()) != os.getpid()  # a worker did die
    assert_same_index(single, out)


def fail_on(shard: int, on_shard: int) -> None:
    if shard == on_shard:
        raise FileNotFoundError("no model at /nowhere on this node")


def test_a_failing_worker_is_reported_and_the_old_index_kept(ray_local, gpt2, family, single,
                                                             tmp_path):
    from core.index_ray import RayConfig

    target = tmp_path / "kept.duckdb"
    target.write_bytes(single.read_bytes())
    with pytest.raises(ValueError, match=r"failed in a worker \(FileNotFoundError: no model "
                                         r"at /nowhere on this node\)\. Fix that"):
        build_index(gpt2, family, INDEX_TEXTS, target, CFG, progress=lambda f, m: None,
                    ray=RayConfig(workers=2, before_shard=functools.partial(fail_on,
                                                                            on_shard=1)))
    assert target.read_bytes() == single.read_bytes()


def test_without_ray_the_message_names_the_install(gpt2, sae, tmp_path, monkeypatch):
    from core.index_ray import RayConfig

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    with pytest.raises(ValueError, match=r"pip install 'ray\[data\]"):
        build_index(gpt2, {"s": sae}, INDEX_TEXTS, tmp_path / "x.duckdb", CFG, ray=RayConfig())
    assert not (tmp_path / "x.duckdb").exists()


def test_the_command_line_builds_on_ray(ray_local, tiny_dir, tmp_path, capsys):
    import json

    from core.feature_index import FeatureIndex
    from core.index import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t}) for t in INDEX_TEXTS))
    out = tmp_path / "cli.duckdb"
    main(["--model", f"local:{tiny_dir / 'tiny-gpt2'}", "--device", "cpu",
          "--sae", f"local:{tiny_dir / 'sae-gpt2-l1'}", "--corpus", str(corpus),
          "--tokens", "600", "--context", "16", "--shard-windows", "32", "--out", str(out),
          "--ray", "--workers", "2"])
    index = FeatureIndex(out)
    assert index.meta["streamed_on"] == "Ray (local), 2 workers"
    assert "2 of 2 shards done on 2 CPU workers" in capsys.readouterr().err  # the tqdm bar


def test_the_command_line_names_the_install_when_ray_is_missing(tiny_dir, tmp_path,
                                                                monkeypatch):
    from core.index import main

    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(SystemExit, match=r"pip install 'ray\[data\]"):
        main(["--sae", f"local:{tiny_dir / 'sae-gpt2-l1'}", "--corpus", "x.jsonl",
              "--out", str(tmp_path / "x.duckdb"), "--ray"])


def test_bad_ray_settings_are_refused():
    from core.index_ray import RayConfig

    with pytest.raises(ValueError, match="workers=0"):
        RayConfig(workers=0)
    with pytest.raises(ValueError, match="address is empty"):
        RayConfig(address=" ")
    with pytest.raises(ValueError, match="multiple of batch_windows=16"):
        IndexConfig(shard_windows=40)


class _Sae:  # what _ShardAccumulator reads of an SAE
    d_sae, d_in = 6, 2


def shard_of(feats: torch.Tensor, first: int, shard: int, cfg: IndexConfig):
    acc = _ShardAccumulator(_Sae())
    acc.add(feats, torch.arange(first, first + len(feats)))
    acc.recon.fires += (feats > 0).sum(0)
    return acc.finish(shard, cfg)


@pytest.mark.parametrize("cuts", [[0, 300], [0, 7, 150, 151, 300], [0, 1, 2, 299, 300]])
def test_partial_tables_merge_to_the_one_piece_answer(cuts):
    """Top-k and the keyed sample of a union equal those merged from its parts, ties included
    (activations rounded so many tokens tie; the earlier token wins)."""
    cfg = IndexConfig(context_size=16, max_tokens=600, top_k=5, n_sample=7, batch_windows=1,
                      shard_windows=1)
    feats = (torch.rand(300, 6) * 4).round() * (torch.rand(300, 6) > 0.5)
    whole = Running(6, 2, cfg.top_k, cfg.n_sample)
    whole.merge(shard_of(feats, 0, 0, cfg))
    parts = Running(6, 2, cfg.top_k, cfg.n_sample)
    for i, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
        parts.merge(shard_of(feats[lo:hi], lo, i, cfg))
    for name in ("top_val", "top_pos", "smp_key", "smp_val", "smp_pos", "maximum"):
        assert torch.equal(getattr(whole, name), getattr(parts, name)), name
    assert torch.equal(whole.recon.fires, parts.recon.fires)
    for latent in range(6):  # the top-k by (value desc, position asc), by brute force
        col = feats[:, latent]
        want = sorted(((-float(col[p]), p) for p in range(300) if col[p] > 0))[:cfg.top_k]
        assert whole.top_pos[latent][:len(want)].tolist() == [p for _, p in want]


def test_shards_must_merge_in_order():
    cfg = IndexConfig(context_size=16, max_tokens=600, batch_windows=1, shard_windows=1)
    run = Running(6, 2, cfg.top_k, cfg.n_sample)
    with pytest.raises(ValueError, match="Shard 1 arrived where shard 0 was due"):
        run.merge(shard_of(torch.rand(4, 6), 0, 1, cfg))


def test_lookup_page_builds_on_the_configured_cluster(ray_local, tiny_dir, tmp_path,
                                                      monkeypatch):
    from core.feature_index import FeatureIndex, built_index_location
    from core.models import ModelSpec, load_model

    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    monkeypatch.setenv("SAE_WORKBENCH_RAY", "local")
    at = tiny_page(tiny_dir, "lookup")
    assert at.checkbox(key="lookup_build_ray").value is True
    assert "Ray cluster at local" in at.checkbox(key="lookup_build_ray").label
    at.radio(key="lookup_build_source").set_value("Upload .txt / .jsonl")
    at.file_uploader(key="lookup_build_upload").set_value(
        ("corpus.txt", "\n\n".join(INDEX_TEXTS).encode(), "text/plain"))
    at.number_input(key="lookup_build_tokens").set_value(2_000)
    at.button(key="FormSubmitter:lookup_build-Build index").click().run()
    assert not at.exception, at.exception
    # once built, the latent tab renders; its patch-scoping panel rightly says that the default
    # prompt is longer than tiny-gpt2's 128 positions: any other error is the build's
    errors = [e.value for e in at.error if "reads at most 128" not in e.value]
    assert not errors, errors
    lm = load_model(ModelSpec("local", str(tiny_dir / "tiny-gpt2"), device="cpu"))
    sae = load_sae(SaeSpec("local", str(tiny_dir / "sae-gpt2-l1")), lm)
    path, name = built_index_location(lm, sae)
    assert FeatureIndex(path).sae_stats(name)["tokens"] > 1_000
    assert FeatureIndex(path).meta["streamed_on"] == "Ray (local), 2 workers"
    assert at.number_input(key="lookup_latent") is not None  # the page shows the new index


def test_without_a_cluster_the_page_offers_no_ray_build(tiny_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SAE_WORKBENCH_CACHE", str(tmp_path))
    monkeypatch.delenv("SAE_WORKBENCH_RAY", raising=False)
    at = tiny_page(tiny_dir, "lookup")
    assert not at.exception
    assert not [c for c in at.checkbox if c.key == "lookup_build_ray"]


def test_reconstruction_sums_do_not_depend_on_the_thread_count():
    """Workers run with one thread each, a build on one machine with several: the FVE sums must
    not round differently (a whole-tensor sum splits over threads; these tensors are big
    enough to be split)."""
    from core.saes import ReconstructionStats

    x = torch.randn(4096, 640) * 10.0 ** torch.randint(-3, 4, (4096, 640))
    recon = torch.randn(4096, 640)
    feats = torch.rand(4096, 64) - 0.5
    threads = torch.get_num_threads()
    sums = []
    try:
        for n in (2, 1):
            torch.set_num_threads(n)
            st = ReconstructionStats(640, 64)
            st.update(x, feats, recon)
            sums.append((st.sq_err, st.sum_sq, st.sum_x.clone(), st.fve, st.l0))
    finally:
        torch.set_num_threads(threads)
    assert sums[0][:2] == sums[1][:2] and torch.equal(sums[0][2], sums[1][2])
    assert sums[0][3:] == sums[1][3:]
