"""Dreaming quality: does one run find text that is both fluent and as strong as the corpus?

For a seeded random sample of alive latents of one embedded SAE (alive: it fired in the feature
index), dream with the app's defaults for the device (``core.dreaming.default_config``: several
XE weights at once, the score's activation divided by the latent's corpus top-1) and look at the
run's activation-vs-XE Pareto front, re-scored in float32. As on the page, the run starts from
text the model writes plus cuts of the latent's top corpus examples (``core.dreaming.
corpus_seeds``; ``--start sample`` leaves the cuts out). A latent counts as reached when,
within ``--iters`` iterations, the front holds a prompt that is not one of those cuts whose
activation is at least the latent's corpus top-1 (its max activation in the index, read with
the whole 128-token context) AND whose XE is at most ``--fluent-xe`` nats per token; a cut
already that strong is reported apart (``seed_reached``) and does not count. Goal: >= 60% of
the latents. Each latent's row has the corpus top-1, the best
fluent prompt of the front (text, activation, XE), the iteration such a prompt first appeared (by
the run's own scores), the strongest prompt of the front and the seconds the run took.

    python benchmarks/dreaming_quality.py [--device cpu|cuda] [--sae w4096] [--latents 12]
        [--pick-seed 0] [--iters 200] [--seed 0] [--threads N] [--index PATH]
        [--fluent-cap 5.75] [--gpu-defaults] [--shard I/N] [--start corpus|sample]
"""

from __future__ import annotations

import json
import random
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import arguments, parse  # noqa: E402
from benchmarks.record import save as record_run  # noqa: E402
from core.dreaming import (  # noqa: E402
    FLUENT_XE,
    Objective,
    Prompt,
    best_fluent,
    corpus_seeds,
    default_config,
    dream,
    seed_prompts,
)
from core.dream_passes import PACK_TOKENS, evaluate, set_pack_tokens  # noqa: E402
from core.feature_index import EMBEDDED_INDEX, FeatureIndex  # noqa: E402
from core.models import ModelSpec, load_model  # noqa: E402
from core.saes import SaeSpec, load_sae  # noqa: E402


def rescore(lm, objective, front) -> list[Prompt]:
    """The front re-scored in float32 (dreaming scores in bfloat16 on a CPU that has it)."""
    lengths = torch.tensor([len(p.ids) for p in front])
    ids = torch.zeros(len(front), int(lengths.max()), dtype=torch.long)
    for i, p in enumerate(front):
        ids[i, :len(p.ids)] = torch.tensor(p.ids)
    ev = evaluate(lm, objective, ids, lengths)
    return [replace(p, activation=float(a), xe=float(x))
            for p, a, x in zip(front, ev.activation, ev.xe)]


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--sae", default="w4096")
    parser.add_argument("--latents", type=int, default=12)
    parser.add_argument("--pick-seed", type=int, default=0, help="seed of the latent choice")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0, help="dreaming seed")
    parser.add_argument("--fluent-xe", type=float, default=FLUENT_XE)
    parser.add_argument("--index", default=str(EMBEDDED_INDEX),
                        help="feature index with the SAE (default: the shipped one)")
    parser.add_argument("--shard", default="0/1",
                        help="I/N: run every N-th of the chosen latents from the I-th (several "
                             "processes on one GPU)")
    parser.add_argument("--fluent-cap", type=float, default=None,
                        help="add the fluent-cap member with this XE cap (e.g. 5.75) to the "
                             "defaults (core.dreaming.DreamConfig.fluent_cap)")
    parser.add_argument("--start", choices=("corpus", "sample"), default="corpus",
                        help="corpus: the app's start (model text + cuts of the top corpus "
                             "examples); sample: model text only")
    parser.add_argument("--gpu-defaults", action="store_true",
                        help="with --device cuda: the app's GPU defaults (else the CPU's)")
    parser.add_argument("--pack", type=int, default=None,
                        help="most candidate tokens per packed pass on this device (0: whole "
                             "passes; default: core.dream_passes.PACK_TOKENS)")
    args = parse(parser)
    shard, shards = (int(x) for x in args.shard.split("/"))
    lm = load_model(ModelSpec(device=args.device))
    if args.pack is not None:
        set_pack_tokens(lm.device.type, args.pack)
    sae = load_sae(SaeSpec("embedded", args.sae), lm)
    index = FeatureIndex(args.index)
    latents = sorted(random.Random(args.pick_seed).sample(index.alive_latents(args.sae, with_examples=True),
                                                          args.latents))[shard::shards]
    defaults = settings_device(args, lm)
    rows, path = [], None
    for latent in latents:
        data = index.latent(args.sae, latent)
        top1 = data.max_act
        cfg = default_config(defaults, iters=args.iters, seed=args.seed, act_scale=top1,
                             **overrides(args))
        if args.start == "corpus":
            cfg = replace(cfg, seeds=corpus_seeds(lm, [(ex.token_ids, ex.pos) for ex in data.top],
                                                  cfg))
        cuts = set(seed_prompts(lm, cfg))
        start = time.perf_counter()
        reached_at = None
        objective = Objective.sae_latent(sae, latent)
        for step in dream(lm, objective, cfg):
            if step.iteration == 0:
                seeds = rescore(lm, objective, [p for p in step.front if p.ids in cuts]) \
                    if cuts else []
            fluent = best_fluent([p for p in step.front if p.ids not in cuts], args.fluent_xe)
            if reached_at is None and fluent is not None and fluent.activation >= top1:
                reached_at = step.iteration
        front = rescore(lm, objective, step.front)
        fluent = best_fluent([p for p in front if p.ids not in cuts], args.fluent_xe)
        seed = best_fluent(seeds, args.fluent_xe)
        strongest = front[-1]
        row = {"latent": latent, "corpus_top1": round(top1, 2),
               "reached": fluent is not None and fluent.activation >= top1,
               "reached_at": reached_at, "seeds": len(cfg.seeds),
               "seed_reached": seed is not None and seed.activation >= top1,
               "seed_fluent": None if seed is None else {
                   "text": seed.text, "activation": round(seed.activation, 2),
                   "xe": round(seed.xe, 2)},
               "fluent": None if fluent is None else {
                   "text": fluent.text, "activation": round(fluent.activation, 2),
                   "xe": round(fluent.xe, 2), "tokens": len(fluent.ids) - 1},
               "strongest": {"text": strongest.text,
                             "activation": round(strongest.activation, 2),
                             "xe": round(strongest.xe, 2)},
               "front_size": len(step.front),
               "seconds": round(time.perf_counter() - start, 1)}
        rows.append(row)
        print(json.dumps(row, ensure_ascii=False), flush=True)
        path = save(args, lm, index, latents, rows, path)
    print(f"written to {path}")


def overrides(args) -> dict:
    """What the run changes in the defaults."""
    return {} if args.fluent_cap is None else {"fluent_cap": args.fluent_cap}


def settings_device(args, lm):
    """Whose defaults the run uses: the device's with ``--gpu-defaults``, else the CPU's."""
    return lm.device if args.gpu_defaults else "cpu"


def save(args, lm, index, latents, rows, path):
    """Write the figures so far (after every latent, so a run cut short keeps what it did)."""
    defaults = settings_device(args, lm)
    config = {k: v for k, v in asdict(default_config(defaults, iters=args.iters, seed=args.seed,
                                                     **overrides(args))).items()
              if k != "stop"}
    ratios = sorted(r["fluent"]["activation"] / r["corpus_top1"] for r in rows if r["fluent"])
    result = {
        "model": lm.name, "sae": args.sae, "index": args.index,
        "index_tokens": index.meta.get("tokens"), "latents": latents,
        "pick_seed": args.pick_seed, "shard": args.shard, "start": args.start,
        "pack_tokens": PACK_TOKENS.get(lm.device.type, 0),
        "defaults": f"{torch.device(defaults).type} defaults (core.dreaming.default_config)",
        "config": {**config, "act_scale": "the latent's corpus top-1"},
        "fluent_xe": args.fluent_xe,
        "reached": sum(r["reached"] for r in rows), "of": len(rows),
        "seed_reached": sum(r["seed_reached"] for r in rows),
        "fraction_reached": round(sum(r["reached"] for r in rows) / len(rows), 3),
        "median_fluent_over_top1": round(ratios[len(ratios) // 2], 3) if ratios else None,
        "seconds": round(sum(r["seconds"] for r in rows), 1), "rows": rows, "goal": 0.6,
        "complete": len(rows) == len(latents),
    }
    if path is not None:
        path.unlink()
    name = "dreaming_quality" if args.shard == "0/1" else \
        "dreaming_quality-shard" + args.shard.replace("/", "of")
    path = record_run(name, result, str(lm.device))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1), flush=True)
    return path


if __name__ == "__main__":
    main()
