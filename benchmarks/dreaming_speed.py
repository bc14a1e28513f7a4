"""Dreaming speed: core.dreaming against a faithful reimplementation of the reference loop.

The reference (the dreaming notebook's loop) keeps prompts as text: every iteration it
re-encodes the best prompt, builds each candidate in a Python loop (one operation per candidate
at a random position), decodes it to text, and scores every candidate with its own forward pass
after re-encoding it. core.dreaming keeps token ids as tensors, builds the candidates with tensor
ops and scores them in one batched pass. Both use the same parameters, operations, score, banned
tokens, model, SAE and device; iterations per second and the final best activation are compared
over several seeds. Goal: >= 3x the reference's it/s at equal final activation on a GPU.

    python benchmarks/dreaming_speed.py [--device cpu|cuda] [--sae w512] [--latent 5]
        [--iters 20] [--seeds 0 1 2] [--explore 24] [--max-tokens 12]
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import save  # noqa: E402

from core.dreaming import (
    DreamConfig,
    Objective,
    banned_tokens,
    dream,
    embed_one_hot,
)
from core.hooks import hooked
from core.models import ModelSpec, load_model
from core.saes import SaeSpec, load_sae, sae_input
from core.text import token_ids

OPS = ("gcg", "insert", "swap", "delete")


def reference_dream(lm, sae, latent: int, cfg: DreamConfig):
    """The reference loop: text in, text out, one candidate at a time. Yields (iteration,
    best activation, best XE, seconds) per iteration."""
    rng = random.Random(cfg.seed)
    tok = lm.tokenizer
    banned = banned_tokens(lm).to(lm.device)
    s = sae.sae

    def activation(acts):
        x = s.process_sae_in(sae_input(sae, acts).to(s.dtype)).float()
        pre = x @ s.W_enc[:, latent].float() + s.b_enc[latent].float()
        if getattr(s.cfg, "rescale_acts_by_decoder_norm", False):
            pre = pre * s.W_dec[latent].float().norm()
        return pre

    def run(ids):
        store = {}

        def keep(a):
            store["a"] = a

        with hooked(lm, {sae.hook_name: keep}):
            logits = lm.model(input_ids=ids, use_cache=False).logits
        return logits, store["a"]

    @torch.no_grad()
    def score_text(text):
        ids = torch.tensor([token_ids(lm, text)], device=lm.device)  # re-encode every candidate
        logits, acts = run(ids)
        act = float(activation(acts[0, -1]))
        xe = float(F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]))
        score = -act + cfg.xe_regularization * xe
        if cfg.xe_max is not None and xe > cfg.xe_max:
            score = float("inf")
        return {"text": text, "act": act, "xe": xe, "score": score}

    def parent_pass(ids, grad):
        vocab = lm.model.get_input_embeddings().weight.shape[0]
        one_hot = F.one_hot(torch.tensor(ids, device=lm.device), vocab).float()[None]
        one_hot.requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            store = {}

            def keep(a):
                store["a"] = a

            with hooked(lm, {sae.hook_name: keep}):
                embeds = embed_one_hot(lm, one_hot)
                logits = lm.model(inputs_embeds=embeds, use_cache=False).logits
            logp = torch.log_softmax(logits[0].float(), -1)
            if not grad:
                return logp.detach(), None
            xe = -(one_hot[0, 1:] * logp[:-1]).sum(-1).mean()
            loss = -activation(store["a"][0, -1]) + cfg.xe_regularization * xe
            loss.backward()
        return logp.detach(), one_hot.grad[0]

    start = time.perf_counter()
    buffer = [score_text(cfg.init_prompt)]
    for it in range(1, cfg.iters + 1):
        t0 = time.perf_counter()
        ids = token_ids(lm, buffer[0]["text"])  # decode/re-encode round trip every step
        n = len(ids) - 1
        weights = list(cfg.probabilities)
        if n >= cfg.max_tokens:
            weights[1] = 0
        if n <= cfg.min_tokens:
            weights[3] = 0
        op = rng.choices(OPS, weights=weights)[0] if sum(weights) else "swap"
        logp = grad = None
        if op != "delete":
            logp, grad = parent_pass(ids, op == "gcg")
        cands = []
        for _ in range(cfg.explore):  # one candidate at a time
            new = list(ids)
            if op == "delete":
                del new[rng.randrange(1, len(new))]
            elif op == "insert":
                pos = rng.randrange(1, len(new) + 1)
                top = logp[pos - 1].masked_fill(banned, -float("inf")).topk(cfg.sample_k2)
                probs = torch.softmax(top.values, -1).tolist()
                new.insert(pos, int(top.indices[rng.choices(range(len(probs)), probs)[0]]))
            elif op == "swap":
                pos = rng.randrange(1, len(new))
                top = logp[pos - 1].masked_fill(banned, -float("inf")).topk(cfg.sample_k2)
                probs = torch.softmax(top.values, -1).tolist()
                new[pos] = int(top.indices[rng.choices(range(len(probs)), probs)[0]])
            else:
                pos = rng.randrange(1, len(new))
                top = (-grad[pos]).masked_fill(banned, -float("inf")).topk(cfg.gcg_topk)
                new[pos] = int(top.indices[rng.randrange(cfg.gcg_topk)])
            cands.append(tok.decode(new[1:]))
        scored = [score_text(text) for text in cands]
        seen, merged = set(), []
        for entry in sorted(buffer + scored, key=lambda e: e["score"]):
            if entry["text"] not in seen:
                seen.add(entry["text"])
                merged.append(entry)
        buffer = merged[:cfg.buffer_size]
        yield it, buffer[0]["act"], buffer[0]["xe"], time.perf_counter() - t0
    log = logging.getLogger(__name__)
    log.info("reference done in %.1f s", time.perf_counter() - start)


def timed(steps):
    """(final activation, final XE, iterations per second) of a run (iteration 0 excluded)."""
    seconds, last = 0.0, None
    for last in steps:
        seconds += last[-1]
    return last[1], last[2], (last[0] / seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sae", default="w512")
    parser.add_argument("--latent", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--explore", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--init", default="The weather today is")
    args = parser.parse_args()
    lm = load_model(ModelSpec(device=args.device))
    sae = load_sae(SaeSpec("embedded", args.sae), lm)
    objective = Objective.sae_latent(sae, args.latent)
    ours, ref = [], []
    for seed in args.seeds:
        cfg = DreamConfig(iters=args.iters, seed=seed, explore=args.explore,
                          max_tokens=args.max_tokens, init_prompt=args.init)
        steps = ((s.iteration, s.best.activation, s.best.xe, s.seconds)
                 for s in dream(lm, objective, cfg) if s.iteration > 0)
        ours.append(timed(steps))
        ref.append(timed(reference_dream(lm, sae, args.latent, cfg)))
        print(json.dumps({"seed": seed, "ours": ours[-1], "reference": ref[-1]}), flush=True)

    def summary(runs):
        return {"it_per_s": round(statistics.mean(r[2] for r in runs), 3),
                "final_activation_mean": round(statistics.mean(r[0] for r in runs), 2),
                "final_activation": [round(r[0], 2) for r in runs],
                "final_xe": [round(r[1], 2) for r in runs]}

    result = {
        "device": str(lm.device), "model": lm.name, "sae": args.sae, "latent": args.latent,
        "threads": torch.get_num_threads(), "iters": args.iters, "seeds": args.seeds,
        "explore": args.explore, "max_tokens": args.max_tokens, "init_prompt": args.init,
        "ours": summary(ours), "reference": summary(ref),
        "speedup": round(summary(ours)["it_per_s"] / summary(ref)["it_per_s"], 2),
        "speedup_goal_gpu": 3.0,
    }
    save("dreaming_speed", result, device=str(lm.device))


if __name__ == "__main__":
    main()
