"""Dreaming's parent passes: a buffer head's next-token distribution from the pass that scored it.

Sampled inserts and swaps (and XE's share of the GCG gradient) need the parent prompt's
next-token distribution. core.dreaming keeps each new buffer head's final hidden states from the
scoring pass, so that distribution costs the unembedding only; with ``HIDDEN_BUDGET`` at 0 it
runs a forward pass of its own per new head, as before. Same model, SAE latent, defaults and
seed on both sides, alternating; figures per run: the loop's seconds (iteration 0 excluded),
parent forward passes, and whether the two histories are identical (best prompt per iteration).

    python benchmarks/dreaming_reuse.py [--device cpu|cuda] [--sae w4096] [--latent 273]
        [--seeds 0 1] [--iters 12] [--gpu-defaults] [--threads N]
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import core.dream_passes as passes  # noqa: E402
import core.dreaming as dreaming  # noqa: E402
from benchmarks.record import arguments, parse  # noqa: E402
from benchmarks.record import save as record_run  # noqa: E402
from core.dreaming import Objective, default_config, dream  # noqa: E402
from core.feature_index import EMBEDDED_INDEX, FeatureIndex  # noqa: E402
from core.models import ModelSpec, load_model  # noqa: E402
from core.saes import SaeSpec, load_sae  # noqa: E402


def run(lm, objective, cfg, keep: bool, calls: list) -> dict:
    kind = lm.device.type
    budget = passes.HIDDEN_BUDGET[kind]
    passes.HIDDEN_BUDGET[kind] = budget if keep else 0
    calls.clear()
    loop, best = 0.0, []
    try:
        for s in dream(lm, objective, cfg):
            loop += s.seconds if s.iteration else 0.0
            best.append(s.best.ids)
    finally:
        passes.HIDDEN_BUDGET[kind] = budget
    return {"loop_seconds": round(loop, 3), "parent_passes": len(calls),
            "best_activation": round(s.best.activation, 2), "history": best}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--sae", default="w4096")
    parser.add_argument("--latent", type=int, default=273)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--iters", type=int, default=12)
    parser.add_argument("--gpu-defaults", action="store_true",
                        help="with --device cuda: the app's GPU defaults (else the CPU's)")
    args = parse(parser)
    lm = load_model(ModelSpec(device=args.device))
    sae = load_sae(SaeSpec("embedded", args.sae), lm)
    top1 = FeatureIndex(str(EMBEDDED_INDEX)).latent(args.sae, args.latent).max_act
    objective = Objective.sae_latent(sae, args.latent)
    calls: list = []
    real = dreaming.next_token_logp
    dreaming.next_token_logp = lambda lm_, ids: calls.append(1) or real(lm_, ids)
    defaults = lm.device if args.gpu_defaults else "cpu"
    rows = []
    for seed in args.seeds:
        cfg = default_config(defaults, iters=args.iters, seed=seed, act_scale=top1)
        before = run(lm, objective, cfg, False, calls)
        after = run(lm, objective, cfg, True, calls)
        same = before.pop("history") == after.pop("history")
        rows.append({"seed": seed, "parent_pass": before, "reuse": after, "same_history": same})
        print(rows[-1], flush=True)
    record_run("dreaming_reuse", {
        "model": lm.name, "sae": args.sae, "latent": args.latent, "iters": args.iters,
        "defaults": f"{torch.device(defaults).type} defaults (core.dreaming.default_config)",
        "cpu_native_bfloat16": bool(torch.cpu._is_avx512_bf16_supported()),
        "parent_passes_before": [r["parent_pass"]["parent_passes"] for r in rows],
        "parent_passes_after": [r["reuse"]["parent_passes"] for r in rows],
        "all_histories_identical": all(r["same_history"] for r in rows),
        "median_loop_seconds_before": statistics.median(r["parent_pass"]["loop_seconds"]
                                                        for r in rows),
        "median_loop_seconds_after": statistics.median(r["reuse"]["loop_seconds"]
                                                       for r in rows),
        "rows": rows}, str(lm.device))


if __name__ == "__main__":
    main()
