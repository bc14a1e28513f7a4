"""Index build on Ray against the single-process build, in one run on one machine: the whole job
a user waits for (``build_index``: streaming, tables, stored spans, write) and its streaming
pass, in tokens/s, for the single-process build and for Ray builds with 1 and 2 workers (each
worker one CPU thread; the single process uses torch's default threads). The Ray builds start
a local Ray each time and load the model and SAE in every worker; that is part of what the user
waits for and is reported apart as the time to the first shard. The three indexes are compared
table by table (they must be identical).

    python benchmarks/index_scale.py [--tokens 8192] [--sae embedded:w4096] [--workers 1 2]
    python benchmarks/index_scale.py --merge-only 8192 65536 524288
"""

from __future__ import annotations

import argparse
import pickle
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import save  # noqa: E402

import duckdb  # noqa: E402
import torch  # noqa: E402

from core.index import IndexConfig, build_index  # noqa: E402
from core.index_ray import RayConfig  # noqa: E402
from core.index_stats import shard_stats  # noqa: E402
from core.models import load_model, parse_model_param  # noqa: E402
from core.saes import embedded_saes, load_sae, parse_sae_param  # noqa: E402
from core.text import windows  # noqa: E402
from index_speed import texts  # noqa: E402

TABLES = {"latents": "sae, latent", "top_examples": "sae, latent, rank",
          "interval_samples": "sae, latent, interval, token", "shown_spans": "sae, latent",
          "saes": "sae", "sequences": "seq"}


def tables(path: Path) -> dict:
    con = duckdb.connect(str(path), read_only=True)
    try:
        return {t: con.execute(f"SELECT * FROM {t} ORDER BY {k}").df() for t, k in TABLES.items()}
    finally:
        con.close()


def timed_build(lm, saes, rows, path: Path, cfg: IndexConfig, ray: RayConfig | None) -> dict:
    """Seconds of the whole build, of its streaming pass, and when each shard was merged."""
    marks: dict[str, float] = {}
    shards: list[float] = []

    def progress(fraction: float, message: str) -> None:
        now = time.perf_counter()
        if "shards done" in message:
            shards.append(now)
        if fraction >= 0.6:
            marks.setdefault("stream_end", now)

    start = time.perf_counter()
    build_index(lm, saes, None, path, cfg, progress=progress, token_rows=rows, ray=ray)
    end = time.perf_counter()
    out = {"whole_s": round(end - start, 2),
           "stream_s": round(marks.get("stream_end", end) - start, 2)}
    if shards:
        out["first_shard_s"] = round(shards[0] - start, 2)
        out["last_shard_s"] = round(shards[-1] - start, 2)
    return out


MERGE_NOTE = ("driver time to merge one shard (of that many tokens, 64 random latents firing per "
              "token) into a 262,144-wide SAE's running tables that already hold one")


def merge_seconds(d_sae: int, tokens: int, l0: int, cfg: IndexConfig) -> float:
    """Seconds the driver takes to merge one shard of a ``d_sae``-wide SAE (``tokens`` tokens,
    ``l0`` latents firing per token at random) into running tables that already hold one."""
    from core.index_stats import Running, ShardStats
    from core.saes import ReconstructionStats

    def part(shard: int) -> ShardStats:
        g = torch.Generator().manual_seed(shard)
        n = tokens * l0
        lat = torch.randint(0, d_sae, (n,), generator=g).sort().values
        val, pos = torch.rand(n, generator=g), torch.randint(0, 2**40, (n,), generator=g)
        key = torch.randint(0, 2**62, (n,), generator=g)
        return ShardStats(shard, torch.zeros(d_sae, dtype=torch.float64), torch.zeros(d_sae),
                          (lat, val, pos), (lat, key, val, pos), ReconstructionStats(1, d_sae))

    run = Running(d_sae, 1, cfg.top_k, cfg.n_sample)
    run.merge(part(0))
    second = part(1)
    start = time.perf_counter()
    run.merge(second)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--sae", default=None, help="default: the widest embedded SAE")
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--shard-windows", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--merge-only", type=int, nargs="+", metavar="TOKENS",
                        help="only time the driver's merge of 262k-wide shards of these sizes")
    args = parser.parse_args()
    if args.merge_only:
        save("index_scale", {"merge_262k_shard_s": {
            str(t): round(merge_seconds(262_144, t, 64, IndexConfig()), 2)
            for t in args.merge_only}, "merge_262k_note": MERGE_NOTE}, device="cpu")
        return
    lm = load_model(parse_model_param(args.model, device="cpu"))
    value = args.sae or f"embedded:{embedded_saes()[-1]}"
    sae = load_sae(parse_sae_param(value), lm)
    saes = {value.split(":")[-1]: sae}
    corpus = texts(args.tokens // 300 + 8)
    rows = list(windows(lm, iter(corpus), args.context))[: args.tokens // (args.context - 1)]
    cfg = IndexConfig(context_size=args.context, max_tokens=len(rows) * (args.context - 1),
                      shard_windows=args.shard_windows)
    n_tokens = sum(sum(t != lm.tokenizer.bos_token_id for t in r) for r in rows)
    parts, _ = shard_stats(lm, saes, rows[:cfg.shard_windows], 0, 0, cfg)
    partial_bytes = len(pickle.dumps(parts))

    runs, results = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = {}
        for name, ray in [("single", None)] + [
                (f"ray_{w}", RayConfig(workers=w, cpus_per_worker=1)) for w in args.workers]:
            paths[name] = Path(tmp) / f"{name}.duckdb"
            runs[name] = timed_build(lm, saes, rows, paths[name], cfg, ray)
            print(name, runs[name], file=sys.stderr)
        base = tables(paths["single"])
        identical = {name: all(base[t].equals(tables(p)[t]) for t in TABLES)
                     for name, p in paths.items() if name != "single"}
    for name, r in runs.items():
        results[name] = {
            **r, "whole_tokens_per_s": round(n_tokens / r["whole_s"]),
            "stream_tokens_per_s": round(n_tokens / r["stream_s"]),
        }
        if "first_shard_s" in r and r["last_shard_s"] > r["first_shard_s"]:
            shards = -(-len(rows) // cfg.shard_windows)
            results[name]["steady_tokens_per_s"] = round(
                n_tokens * (shards - 1) / shards / (r["last_shard_s"] - r["first_shard_s"]))
    figures = {
        "model": lm.name, "sae": value, "d_sae": sae.d_sae, "tokens": n_tokens,
        "windows": len(rows), "shard_windows": cfg.shard_windows,
        "torch_threads_single": torch.get_num_threads(),
        "builds": results, "identical_to_single": identical,
        "shard_partial_bytes": partial_bytes,
        "merge_262k_shard_s": {str(t): round(merge_seconds(262_144, t, 64, cfg), 2)
                               for t in (8_192, 65_536)},
        "merge_262k_note": MERGE_NOTE,
        "steady_note": "tokens of all shards but the first over the time between the first and "
                       "the last shard merged: the workers' rate once loaded",
    }
    save("index_scale", figures, device="cpu")


if __name__ == "__main__":
    main()
