"""Dreaming's per-iteration overhead: what a GPU pays for besides arithmetic.

On a GPU this model's dreaming iteration is short on arithmetic, so its time goes to launching
operations and to the Python around them. Two measurements stand in for those on any machine,
core.dreaming against the dreaming notebook's loop as published (``dreaming_speed.py``'s
``reference_dream``), same objective, parameters, start prompt and seed:

1. **Operations dispatched per iteration** on the embedded model (each a kernel launch on a
   GPU), counted with a ``TorchDispatchMode``. Unless ``--cpu-path`` is given, core.dreaming
   takes its CUDA path on the CPU: whole passes (no packing) and CUDA's budgets in
   ``core.dream_passes`` (all candidates in one pass, 65,536-token vocabulary slices).
2. **Iterations per second on a tiny random model** (``--tiny``: the tests' two-layer GPT-2 with
   a 400-token vocabulary and a 64-latent SAE, built seeded in a temporary directory), where
   the arithmetic is small and what is left is mostly the host's work per iteration. Both
   loops' iterations differ in size (the prompts each search keeps grow to different lengths),
   so it also counts the tokens each reads through the transformer per iteration, and compares
   tokens per second.

    python benchmarks/dreaming_overhead.py [--latent 273] [--iters 8] [--explore 24] [--tiny]
        [--threads N]
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.dreaming_speed import counted, ours, reference_dream, timed  # noqa: E402
from benchmarks.record import arguments, dispatch_counter, parse  # noqa: E402
from benchmarks.record import save as record_run  # noqa: E402
from core import dream_passes  # noqa: E402
from core.dreaming import DreamConfig, Objective, dream  # noqa: E402
from core.models import ModelSpec, load_model  # noqa: E402
from core.saes import SaeSpec, load_sae  # noqa: E402



def ops_per_iteration(steps) -> tuple[list[dict], collections.Counter]:
    """Operations dispatched by each iteration of a dreaming generator (its start excluded)."""
    count = dispatch_counter()
    steps = iter(steps)
    next(steps)
    rows = []
    while True:
        before = count.total
        with count:
            try:
                step = next(steps)
            except StopIteration:
                break
        rows.append({"op": getattr(step, "op", None), "ops": count.total - before})
    return rows, count.by_op


def gpu_path(kind: str) -> None:
    """Make core.dreaming take on ``kind`` the path it takes on CUDA: whole passes (no packing)
    and CUDA's budgets (tokens per scoring pass, logits held, vocabulary slice, hidden states
    kept)."""
    dream_passes.set_pack_tokens(kind, 0)
    for budget in (dream_passes.TOKEN_BUDGET, dream_passes.LOGIT_BUDGET,
                   dream_passes.VOCAB_SLICE, dream_passes.HIDDEN_BUDGET):
        budget[kind] = budget["cuda"]


def config(args, seed: int, vocab: int) -> DreamConfig:
    return DreamConfig(iters=args.iters, seed=seed, explore=args.explore, buffer_size=8,
                       min_tokens=4, max_tokens=args.max_tokens, xe_regularization=0.3,
                       p_gcg=0.25, p_insert=0.25, p_swap=0.25, p_delete=0.25, sample_k2=16,
                       gcg_topk=min(512, vocab // 2), init_prompt="The weather today is")


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--sae", default="w4096")
    parser.add_argument("--latent", type=int, default=273)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--explore", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--cpu-path", action="store_true",
                        help="count core.dreaming's CPU path (packed passes, 2,048-token "
                             "vocabulary slices) instead of its GPU path")
    parser.add_argument("--tiny", action="store_true",
                        help="also time both loops on a tiny random GPT-2")
    parser.add_argument("--tiny-latents", type=int, nargs="+", default=[3, 5])
    parser.add_argument("--tiny-iters", type=int, default=30)
    parser.add_argument("--tiny-explore", type=int, default=128)
    args = parse(parser)
    kind = torch.device(args.device).type
    if not args.cpu_path:
        gpu_path(kind)

    lm = load_model(ModelSpec(device=args.device))
    sae = load_sae(SaeSpec("embedded", args.sae), lm)
    objective = Objective.sae_latent(sae, args.latent)
    runs = []
    for seed in args.seeds:
        cfg = config(args, seed, lm.config.vocab_size)
        mine, mine_by = ops_per_iteration(dream(lm, objective, cfg))
        ref, ref_by = ops_per_iteration(reference_dream(lm, objective, cfg))
        runs.append({"seed": seed, "ours": mine, "reference": ref,
                     "ours_top_ops": mine_by.most_common(10),
                     "reference_top_ops": ref_by.most_common(10)})
        print(json.dumps(runs[-1]), flush=True)
    ours_all = [r["ops"] for run in runs for r in run["ours"]]
    ref_all = [r["ops"] for run in runs for r in run["reference"]]
    figures = {
        "model": lm.name, "sae": args.sae, "latent": args.latent,
        "path": "cpu" if args.cpu_path else "cuda's (whole passes, cuda's budgets)",
        "params": {k: getattr(args, k) for k in ("iters", "explore", "max_tokens", "seeds")},
        "ops_per_iteration": {"ours_median": statistics.median(ours_all),
                              "reference_median": statistics.median(ref_all),
                              "ratio": statistics.median(ours_all) / statistics.median(ref_all)},
        "runs": runs,
    }

    if args.tiny:
        figures["tiny"] = tiny_rates(args)
    path = record_run("dreaming_overhead", figures, str(lm.device))
    print(json.dumps({k: v for k, v in figures.items() if k != "runs"}, indent=1))
    print(f"written to {path}")


def tiny_rates(args) -> dict:
    """Both loops' iterations per second on the tests' tiny random GPT-2 and SAE."""
    from tests.conftest import build_gpt2, build_sae, build_tokenizer, save_model_dir

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = build_tokenizer()
        save_model_dir(build_gpt2(tokenizer), tokenizer, Path(tmp) / "tiny-gpt2", "tiny-gpt2")
        build_sae(32, 64, "blocks.1.hook_resid_post", "tiny-gpt2").save_model(Path(tmp) / "sae")
        lm = load_model(ModelSpec("local", str(Path(tmp) / "tiny-gpt2"), device=args.device))
        sae = load_sae(SaeSpec("local", str(Path(tmp) / "sae")), lm)
        rows = []
        for latent in args.tiny_latents:
            for seed in args.seeds:
                cfg = replace(config(args, seed, lm.config.vocab_size), iters=args.tiny_iters,
                              explore=args.tiny_explore, max_tokens=16)
                obj = Objective.sae_latent(sae, latent)
                tokens: list[int] = []
                a = timed(counted(lm, ours(lm, obj, cfg), tokens))
                b = timed(counted(lm, reference_dream(lm, obj, cfg), tokens))
                per_it = [n / cfg.iters for n in tokens]
                rows.append({"latent": latent, "seed": seed, "ours_it_per_s": a["it_per_s"],
                             "reference_it_per_s": b["it_per_s"],
                             "ratio": a["it_per_s"] / b["it_per_s"],
                             "ours_tokens_per_iteration": per_it[0],
                             "reference_tokens_per_iteration": per_it[1],
                             "tokens_per_s_ratio": a["it_per_s"] * per_it[0]
                             / (b["it_per_s"] * per_it[1])})
                print(json.dumps(rows[-1]), flush=True)
    return {"model": "tiny random GPT-2 (2 layers, d_model 32, vocabulary 400)",
            "iters": args.tiny_iters, "explore": args.tiny_explore, "max_tokens": 16,
            "median_ratio": statistics.median(r["ratio"] for r in rows),
            "median_tokens_per_s_ratio": statistics.median(r["tokens_per_s_ratio"] for r in rows),
            "rows": rows}


if __name__ == "__main__":
    main()
