"""Dreaming speed: core.dreaming against the dreaming notebook's ``dream()`` as published.

The reference (Confirm Labs' SAE dreaming notebook) keeps prompts as text. Per iteration it
picks an operation at random from (GCG swap, sampled insert, sampled swap, delete), forcing an
insert below ``min_tokens`` and a delete above ``max_tokens``, and re-encodes the best prompt's
text without special tokens. GCG: one forward + backward of the objective alone through a
one-hot over the embeddings, the top ``gcg_topk`` tokens of the negative gradient per position,
``explore`` candidates each swapping one random position to one random top-k token. Sampled
insert / swap: one forward of the parent, softmax, ``sample_k2`` tokens drawn per position
(multinomial), one of them picked at random per candidate. Insert and delete build their
candidates in a Python loop (delete: every deletion when ``explore`` exceeds the length, else a
random subset). Then ``batch_decode(..., skip_special_tokens=True)``, ``tokenizer(candidates,
padding=True)`` and ONE forward pass for all candidates; XE is the mean cross-entropy over each
row's tokens; loss = -activation + xe_regularization * XE (XE above ``xe_max``: infinite loss);
the buffer becomes the best ``buffer_size`` of (buffer minus its head) + candidates.

Both sides get the same model, objective (SAE latent's encoder pre-activation at its hook),
parameters, start prompt and device; each run is timed from the start prompt's scoring to the
last iteration. Figures: iterations per second; the tokens each side reads through the
transformer per iteration (the two searches keep prompts of different lengths, so an iteration
is not the same work on both sides) and tokens per second; the best activation each run found
(the reference's best over its whole run, since its buffer drops its head); per latent and
seed, and the median ratios. Goal: >= 3x the reference's it/s on a GPU and >= 2x on a CPU, at
equal or better final activation. Latents: ``--latents`` random alive ones of the SAE (seeded;
alive: it fired in the feature index) unless ``--latent`` names them.

    python benchmarks/dreaming_speed.py [--device cpu|cuda] [--sae w4096] [--latents 4]
        [--seeds 0 1 2] [--iters 10] [--explore 24] [--max-tokens 10] [--xe 0.3] [--threads N]

The defaults fit a 2-core CPU; on a GPU use the issue's setting: ``--device cuda --iters 100
--explore 128 --max-tokens 16``. There core.dreaming's passes replay as CUDA graphs
(``core/graphs.py``; their captures are timed with the run): ``--graphs 0`` turns them off,
``--ablate-graphs`` also times core.dreaming without them in the same runs.
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.record import arguments, parse  # noqa: E402
from benchmarks.record import save as record_run  # noqa: E402
from core import graphs  # noqa: E402
from core.dream_passes import PACK_TOKENS, embed_scale, evaluate, set_pack_tokens  # noqa: E402
from core.dreaming import DreamConfig, Objective, dream  # noqa: E402
from core.hooks import hooked  # noqa: E402
from core.feature_index import EMBEDDED_INDEX, FeatureIndex  # noqa: E402
from core.models import ModelSpec, load_model  # noqa: E402
from core.objectives import objective_weights, read_objective  # noqa: E402
from core.saes import SaeSpec, load_sae  # noqa: E402

OPS = ("gcg", "insert", "swap", "delete")


def reference_dream(lm, objective: Objective, cfg: DreamConfig):
    """The notebook's loop. Yields (iteration, best activation so far, its XE, seconds) per
    iteration, iteration 0 being the start prompt; "best" is the lowest loss seen."""
    rng = random.Random(cfg.seed)
    torch.manual_seed(cfg.seed)
    tok, model, dev = lm.tokenizer, lm.model, lm.device
    readout = objective_weights(lm, objective)
    w_e = model.get_input_embeddings().weight
    scale = embed_scale(lm)
    bos = tok.bos_token_id

    def run(**inputs):
        store = {}
        with hooked(lm, {objective.hook_name: lambda a: store.__setitem__("a", a)}):
            logits = model(**inputs, use_cache=False).logits
        return logits, store["a"]

    @torch.no_grad()
    def score(texts: list[str]) -> list[dict]:
        enc = tok(texts, padding=True, return_tensors="pt").to(dev)  # adds BOS
        logits, acts = run(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
        mask = enc.attention_mask
        last = mask.shape[1] - 1 - mask.flip(1).int().argmax(1)  # left or right padding
        act = read_objective(objective, readout, acts[torch.arange(len(texts)), last])[0]
        ce = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), enc.input_ids[:, 1:],
                             reduction="none")
        real = (mask[:, 1:] * mask[:, :-1]).float()
        xe = (ce * real).sum(1) / real.sum(1).clamp(min=1)
        loss = -act + cfg.xe_regularization * xe
        if cfg.xe_max is not None:
            loss = torch.where(xe > cfg.xe_max, torch.full_like(loss, float("inf")), loss)
        return [{"text": t, "act": float(a), "xe": float(x), "loss": float(v)}
                for t, a, x, v in zip(texts, act.tolist(), xe.tolist(), loss.tolist())]

    def parent_probs(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            logits, _ = run(input_ids=torch.tensor([[bos] + ids], device=dev))
        return torch.softmax(logits[0].float(), -1)

    def gcg_grad(ids: list[int]) -> torch.Tensor:
        one_hot = F.one_hot(torch.tensor([bos] + ids, device=dev), w_e.shape[0]).to(w_e.dtype)
        one_hot.requires_grad_(True)
        embeds = one_hot @ w_e
        if scale is not None:
            embeds = embeds * scale.to(device=dev, dtype=w_e.dtype)
        _, acts = run(inputs_embeds=embeds[None])
        act = read_objective(objective, readout, acts[:, -1])[0][0]
        (-act).backward()
        return one_hot.grad

    t0 = time.perf_counter()
    buffer = score([cfg.init_prompt])
    best = buffer[0]
    yield 0, best["act"], best["xe"], time.perf_counter() - t0
    for it in range(1, cfg.iters + 1):
        t0 = time.perf_counter()
        ids = tok(buffer[0]["text"], add_special_tokens=False).input_ids
        n = len(ids)
        if n < cfg.min_tokens:
            op = "insert"
        elif n > cfg.max_tokens:
            op = "delete"
        else:
            op = rng.choices(OPS, weights=cfg.probabilities)[0]
        cands: list[list[int]] = []
        if op == "gcg":
            top = (-gcg_grad(ids)).topk(cfg.gcg_topk, dim=-1).indices.cpu()
            for _ in range(cfg.explore):
                pos = rng.randrange(n)
                new = list(ids)
                new[pos] = int(top[pos + 1, rng.randrange(cfg.gcg_topk)])
                cands.append(new)
        elif op in ("insert", "swap"):
            probs = parent_probs(ids)
            draws = torch.multinomial(probs, cfg.sample_k2).cpu()  # [n + 1, sample_k2]
            for _ in range(cfg.explore):
                new = list(ids)
                if op == "insert":
                    pos = rng.randrange(n + 1)
                    new.insert(pos, int(draws[pos, rng.randrange(cfg.sample_k2)]))
                else:
                    pos = rng.randrange(n)
                    new[pos] = int(draws[pos, rng.randrange(cfg.sample_k2)])
                cands.append(new)
        else:
            where = range(n) if cfg.explore >= n else rng.sample(range(n), cfg.explore)
            for pos in where:
                cands.append(ids[:pos] + ids[pos + 1:])
        texts = tok.batch_decode(cands, skip_special_tokens=True)
        scored = score(texts)
        buffer = sorted(buffer[1:] + scored, key=lambda e: e["loss"])[:cfg.buffer_size]
        if buffer[0]["loss"] < best["loss"]:
            best = buffer[0]
        yield it, best["act"], best["xe"], time.perf_counter() - t0


def ours(lm, objective: Objective, cfg: DreamConfig):
    """core.dreaming, its final best re-scored in float32 (it scores in bfloat16 on a CPU
    that has it, as on a GPU) so both sides' activations are measured alike."""
    for s in dream(lm, objective, cfg):
        if s.iteration == cfg.iters:
            ev = evaluate(lm, objective, torch.tensor([s.best.ids]))
            yield s.iteration, float(ev.activation[0]), float(ev.xe[0]), s.seconds
        else:
            yield s.iteration, s.best.activation, s.best.xe, s.seconds


def counted(lm, steps, box: list):
    """``steps`` passed through; once they end, appends to ``box`` the tokens the transformer
    read after the first step (the start's scoring), counted at the base model's input."""
    read = [0]

    def pre(module, args, kwargs):
        if graphs.stats(lm)["capturing"]:  # a capture's runs: counted once replayed
            return
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None:
            read[0] += ids.numel()
        elif kwargs.get("inputs_embeds") is not None:
            read[0] += kwargs["inputs_embeds"].shape[:-1].numel()

    steps = iter(steps)
    yield next(steps)
    replayed = graphs.stats(lm)["replayed_tokens"]
    handle = lm.model.base_model.register_forward_pre_hook(pre, with_kwargs=True)
    try:
        yield from steps
    finally:
        handle.remove()
        box.append(read[0] + graphs.stats(lm)["replayed_tokens"] - replayed)


def timed(steps) -> dict:
    """Iterations per second (iteration 0 excluded), wall time, final best activation and XE."""
    start = time.perf_counter()
    loop, last = 0.0, None
    for last in steps:
        if last[0] > 0:
            loop += last[-1]
    return {"it_per_s": last[0] / loop, "seconds": time.perf_counter() - start,
            "activation": last[1], "xe": last[2]}


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--sae", default="w4096")
    parser.add_argument("--latents", type=int, default=4, help="random alive latents")
    parser.add_argument("--latent", type=int, nargs="*", help="these latents instead")
    parser.add_argument("--pick-seed", type=int, default=0, help="seed of the latent choice")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--explore", type=int, default=24)
    parser.add_argument("--buffer", type=int, default=8)
    parser.add_argument("--min-tokens", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=10)
    parser.add_argument("--xe", type=float, default=0.3, help="xe_regularization")
    parser.add_argument("--sample-k2", type=int, default=16)
    parser.add_argument("--gcg-topk", type=int, default=512)
    parser.add_argument("--init", default="The weather today is")
    parser.add_argument("--index", default=str(EMBEDDED_INDEX),
                        help="feature index whose alive latents are drawn (default: the shipped)")
    parser.add_argument("--pack", type=int, default=None,
                        help="most candidate tokens per packed pass on this device (0: whole "
                             "passes; default: core.dream_passes.PACK_TOKENS)")
    parser.add_argument("--graphs", type=int, default=None,
                        help="most padded tokens per CUDA-graph pass on this device (0: no "
                             "graphs; default: core.graphs.GRAPH_TOKENS)")
    parser.add_argument("--ablate-graphs", action="store_true",
                        help="also time core.dreaming with graphs off, in the same runs")
    args = parse(parser)
    lm = load_model(ModelSpec(device=args.device))
    if args.pack is not None:
        set_pack_tokens(lm.device.type, args.pack)
    if args.graphs is not None:
        graphs.set_graph_tokens(lm.device.type, args.graphs)
    graph_tokens = graphs.GRAPH_TOKENS.get(lm.device.type, 0)
    sae = load_sae(SaeSpec("embedded", args.sae), lm)
    if args.latent:
        latents = args.latent
    else:
        alive = FeatureIndex(args.index).alive_latents(args.sae, with_examples=True)
        latents = sorted(random.Random(args.pick_seed).sample(alive, args.latents))
    rows = []
    for latent in latents:
        objective = Objective.sae_latent(sae, latent)
        for seed in args.seeds:
            cfg = DreamConfig(iters=args.iters, seed=seed, explore=args.explore,
                              buffer_size=args.buffer, min_tokens=args.min_tokens,
                              max_tokens=args.max_tokens, xe_regularization=args.xe,
                              p_gcg=0.25, p_insert=0.25, p_swap=0.25, p_delete=0.25,
                              sample_k2=args.sample_k2, gcg_topk=args.gcg_topk,
                              init_prompt=args.init)
            tokens: list[int] = []
            a = timed(counted(lm, ours(lm, objective, cfg), tokens))
            b = timed(counted(lm, reference_dream(lm, objective, cfg), tokens))
            a["tokens_per_iteration"], b["tokens_per_iteration"] = (n / cfg.iters for n in tokens)
            row = {"latent": latent, "seed": seed, "ours": a, "reference": b,
                   "ratio": a["it_per_s"] / b["it_per_s"],
                   "tokens_per_s_ratio": a["it_per_s"] * a["tokens_per_iteration"]
                   / (b["it_per_s"] * b["tokens_per_iteration"])}
            if args.ablate_graphs and graph_tokens:
                graphs.set_graph_tokens(lm.device.type, 0)
                try:
                    row["ours_no_graphs"] = timed(ours(lm, objective, cfg))
                finally:
                    graphs.set_graph_tokens(lm.device.type, graph_tokens)
                row["graphs_speedup"] = a["it_per_s"] / row["ours_no_graphs"]["it_per_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    ratios = [r["ratio"] for r in rows]
    per_latent = {}
    for latent in latents:
        mine = [r for r in rows if r["latent"] == latent]
        per_latent[latent] = {
            "ours_it_per_s": statistics.median(r["ours"]["it_per_s"] for r in mine),
            "reference_it_per_s": statistics.median(r["reference"]["it_per_s"] for r in mine),
            "ratio": statistics.median(r["ratio"] for r in mine),
            "ours_activation": statistics.median(r["ours"]["activation"] for r in mine),
            "reference_activation": statistics.median(r["reference"]["activation"]
                                                      for r in mine)}
    result = {
        "model": lm.name, "sae": args.sae, "latents": latents, "seeds": args.seeds,
        "params": {k: getattr(args, k) for k in ("iters", "explore", "buffer", "min_tokens",
                                                  "max_tokens", "xe", "sample_k2", "gcg_topk",
                                                  "init")},
        "median_ratio": statistics.median(ratios), "min_ratio": min(ratios),
        "median_tokens_per_s_ratio": statistics.median(r["tokens_per_s_ratio"] for r in rows),
        "max_ratio": max(ratios),
        "runs_with_equal_or_better_activation": sum(
            r["ours"]["activation"] >= r["reference"]["activation"] for r in rows),
        "runs": len(rows),
        "median_activation_ours": statistics.median(r["ours"]["activation"] for r in rows),
        "median_activation_reference": statistics.median(r["reference"]["activation"]
                                                         for r in rows),
        "per_latent": per_latent, "rows": rows,
        "goal": {"cuda": 3.0, "cpu": 2.0}[lm.device.type],
        "pack_tokens": PACK_TOKENS.get(lm.device.type, 0),
        "graph_tokens": graph_tokens, "graphs": graphs.stats(lm),
    }
    if any("graphs_speedup" in r for r in rows):
        result["median_graphs_speedup"] = statistics.median(
            r["graphs_speedup"] for r in rows if "graphs_speedup" in r)
    path = record_run("dreaming_speed", result, str(lm.device))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
