"""Dreaming quality: does the dream reach the latent's top corpus activation?

For a random sample of alive latents of one embedded SAE, dream for ``--iters`` iterations and
compare the best activation with the latent's max activation in the shipped feature index.
Reports the fraction of latents whose dream reaches it (goal: most of them), with per-latent
figures. On a CPU this is expensive (each iteration is a batched forward pass of the 270M model
with its 262k-token vocabulary): use a narrow SAE, few latents and small batches there.

    python benchmarks/dreaming_quality.py [--device cpu|cuda] [--sae w512] [--latents 6]
        [--iters 200] [--explore 16] [--max-tokens 10] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import save  # noqa: E402

from core.dreaming import DreamConfig, Objective, dream
from core.feature_index import EMBEDDED_INDEX, FeatureIndex
from core.models import ModelSpec, load_model
from core.saes import SaeSpec, load_sae


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sae", default="w512")
    parser.add_argument("--latents", type=int, default=6)
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--explore", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=10)
    parser.add_argument("--xe-regularization", type=float, default=0.3)
    parser.add_argument("--init", default=None, help="initial prompt (default: random tokens)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    lm = load_model(ModelSpec(device=args.device))
    sae = load_sae(SaeSpec("embedded", args.sae), lm)
    index = FeatureIndex(EMBEDDED_INDEX)
    latents = sorted(random.Random(args.seed).sample(index.alive_latents(args.sae),
                                                     args.latents))
    rows = []
    for latent in latents:
        data = index.latent(args.sae, latent)
        cfg = DreamConfig(iters=args.iters, seed=args.seed, explore=args.explore,
                          max_tokens=args.max_tokens, xe_regularization=args.xe_regularization,
                          init_prompt=args.init)
        start = time.perf_counter()
        reached_at = None
        for step in dream(lm, Objective.sae_latent(sae, latent), cfg):
            if reached_at is None and step.best.activation >= data.max_act:
                reached_at = step.iteration
        row = {"latent": latent, "corpus_max": round(data.max_act, 2),
               "dream": round(step.best.activation, 2), "dream_xe": round(step.best.xe, 2),
               "reached": step.best.activation >= data.max_act, "reached_at": reached_at,
               "text": step.best.text, "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {
        "device": str(lm.device), "threads": torch.get_num_threads(), "sae": args.sae,
        "latents": latents, "iters": args.iters, "explore": args.explore,
        "max_tokens": args.max_tokens, "xe_regularization": args.xe_regularization,
        "init_prompt": args.init,
        "fraction_reached": round(sum(r["reached"] for r in rows) / len(rows), 3),
        "median_ratio_to_corpus_max": round(sorted(r["dream"] / r["corpus_max"]
                                                   for r in rows)[len(rows) // 2], 2),
        "seconds": round(sum(r["seconds"] for r in rows), 1), "rows": rows,
    }
    save("dreaming_quality", result, device=str(lm.device))


if __name__ == "__main__":
    main()
