"""Where a dreaming iteration's time goes, for the reference loop and for core.dreaming.

Times each part of one iteration on the same parent prompt and batch size (median of
``--repeats``): the parent's forward pass (sampled insert/swap), the GCG gradient, building the
candidates (for the reference: the Python loop, ``batch_decode`` and re-tokenizing with padding),
and scoring them split into the transformer, the unembedding (262k tokens for Gemma 3) and the
cross-entropy. core.dreaming's scoring only sends the positions after a candidate's first changed
token through the unembedding (the typical share is measured on sampled swaps), on a CPU runs
only those positions through the transformer too (packed after the parent's cache; the parent
pass that makes the cache is timed apart) and, on a CPU with native bfloat16, scores in bfloat16
as a GPU does.

    python benchmarks/dreaming_profile.py [--device cpu|cuda] [--sae w4096] [--latent 100]
        [--explore 32] [--tokens 12] [--repeats 3]
"""

from __future__ import annotations

import json
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
from core.dream_passes import (  # noqa: E402
    PACK_TOKENS,
    _packed_pass,
    _token_nll,
    can_pack,
    first_change,
    low_precision,
    next_token_logp,
    objective_gradient,
    parent_pass,
    score_candidates,
    set_pack_tokens,
    token_gradient,
    unembedding,
)
from core.dreaming import DreamConfig, Objective, banned_tokens, make_candidates  # noqa: E402
from core.hooks import hooked  # noqa: E402
from core.models import ModelSpec, load_model  # noqa: E402
from core.objectives import objective_weights, read_objective  # noqa: E402
from core.saes import SaeSpec, load_sae  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--sae", default="w4096")
    parser.add_argument("--latent", type=int, default=100)
    parser.add_argument("--explore", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--pack", type=int, default=None,
                        help="most candidate tokens per packed pass on this device (0: whole "
                             "passes; default: core.dream_passes.PACK_TOKENS)")
    args = parse(parser)
    lm = load_model(ModelSpec(device=args.device))
    if args.pack is not None:
        set_pack_tokens(lm.device.type, args.pack)
    sae = load_sae(SaeSpec("embedded", args.sae), lm)
    obj = Objective.sae_latent(sae, args.latent)
    readout = objective_weights(lm, obj)
    dev, tok, model = lm.device, lm.tokenizer, lm.model
    banned = banned_tokens(lm)
    gen = torch.Generator().manual_seed(0)
    allowed = (~banned).nonzero().flatten()
    body = allowed[torch.randint(len(allowed), (args.tokens,), generator=gen)].tolist()
    parent = torch.tensor([tok.bos_token_id] + body)
    cfg = DreamConfig(explore=args.explore, max_tokens=args.tokens + 1, gcg_topk=512,
                      sample_k2=16)
    w_e = model.get_input_embeddings().weight

    def t(fn) -> float:
        fn()
        sync(dev)
        runs = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            sync(dev)
            runs.append(time.perf_counter() - t0)
        return statistics.median(runs)

    def hooked_run(**inputs):
        store = {}
        with hooked(lm, {obj.hook_name: lambda a: store.__setitem__("a", a)}):
            out = model(**inputs, use_cache=False)
        return out, store["a"]

    # --- the reference's parts
    ref = {}
    text = tok.decode(body)
    ref["re_encode_parent"] = t(lambda: tok(text, add_special_tokens=False))

    def ref_parent():
        with torch.no_grad():
            out, _ = hooked_run(input_ids=parent[None].to(dev))
            probs = torch.softmax(out.logits[0].float(), -1)
            torch.multinomial(probs, 16)

    ref["parent_forward_softmax_multinomial"] = t(ref_parent)

    def ref_gcg():
        one_hot = F.one_hot(parent.to(dev), w_e.shape[0]).to(w_e.dtype).requires_grad_(True)
        out, acts = hooked_run(inputs_embeds=(one_hot @ w_e)[None] * float(
            getattr(model.get_input_embeddings(), "embed_scale", 1.0)))
        (-read_objective(obj, readout, acts[:, -1])[0][0]).backward()
        (-one_hot.grad).topk(512, dim=-1)

    ref["gcg_one_hot_forward_backward_topk"] = t(ref_gcg)
    logp = next_token_logp(lm, parent)
    cands = make_candidates("swap", parent, logp, None, banned, cfg, gen)
    bodies = [row[1:] for row in cands.tolist()]
    ref["decode_and_retokenize_candidates"] = t(lambda: tok(
        tok.batch_decode(bodies, skip_special_tokens=True), padding=True, return_tensors="pt"))
    enc = tok(tok.batch_decode(bodies, skip_special_tokens=True), padding=True,
              return_tensors="pt").to(dev)
    with torch.no_grad():
        ref["score_whole_forward"] = t(lambda: hooked_run(**enc))
        ref["score_transformer_only"] = t(lambda: model.base_model(**enc, use_cache=False))
        hidden = model.base_model(**enc, use_cache=False).last_hidden_state
        ref["score_unembedding_all_positions"] = t(lambda: model.lm_head(hidden))
        logits = model.lm_head(hidden)
        ref["score_cross_entropy_all_positions"] = t(lambda: F.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), enc.input_ids[:, 1:], reduction="none"))

    # --- core.dreaming's parts
    ours = {}
    ours["parent_next_token_logp"] = t(lambda: next_token_logp(lm, parent))
    ours["gcg_objective_gradient_to_its_layer"] = t(
        lambda: objective_gradient(lm, obj, readout, parent))
    grad_obj = objective_gradient(lm, obj, readout, parent)
    ours["gcg_token_gradient_per_weight"] = t(lambda: token_gradient(grad_obj, logp, 0.1, 10.0))
    ours["make_candidates_and_unique"] = t(lambda: torch.unique(make_candidates(
        "swap", parent, logp, None, banned, cfg, gen), dim=0))
    uniq = torch.unique(cands, dim=0).to(dev)
    first = first_change(uniq.cpu(), parent).to(dev)
    lengths = torch.full((len(uniq),), uniq.shape[1], device=dev)
    with torch.no_grad():
        ours["score_transformer_only"] = t(lambda: model.base_model(input_ids=uniq,
                                                                     use_cache=False))
        hidden = model.base_model(input_ids=uniq, use_cache=False).last_hidden_state
        ours["score_unembedding_and_xe_changed_positions"] = t(
            lambda: _token_nll(lm, hidden, uniq, lengths, first, fast=True))
        ours["score_unembedding_and_xe_all_positions"] = t(
            lambda: _token_nll(lm, hidden, uniq, lengths, torch.zeros_like(first), fast=True))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision(lm)):
            ours["score_transformer_as_dreaming_does"] = t(
                lambda: model.base_model(input_ids=uniq, use_cache=False))
        known = score_candidates(lm, obj, readout, parent[None].to(dev)).nll[0]
        ours["score_whole_float32"] = t(lambda: score_candidates(
            lm, obj, readout, uniq, first=first, known=known))
        ours["parent_pass_with_cache"] = t(lambda: parent_pass(lm, parent))
        state = parent_pass(lm, parent) if can_pack(lm) else None
        if state is not None:
            keep_from = first.clamp(min=0, max=uniq.shape[1] - 1)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=low_precision(lm)):
                ours["score_transformer_packed"] = t(
                    lambda: _packed_pass(lm, uniq, keep_from, state))
        ours["score_whole_as_dreaming_does"] = t(lambda: score_candidates(
            lm, obj, readout, uniq, first=first, known=known, parent=parent, fast=True,
            state=state))
    share = float(((uniq.shape[1] - first.cpu()).clamp(min=0).sum())
                  / (len(uniq) * (uniq.shape[1] - 1)))
    result = {"model": lm.name, "sae": args.sae, "latent": args.latent,
              "explore": args.explore, "tokens": args.tokens, "repeats": args.repeats,
              "low_precision": low_precision(lm), "head_dtype": str(unembedding(lm, True).dtype),
              "unique_candidates": len(uniq), "pack_tokens": PACK_TOKENS.get(dev.type, 0),
              "changed_position_share": round(share, 3),
              "reference_seconds": {k: round(v, 4) for k, v in ref.items()},
              "ours_seconds": {k: round(v, 4) for k, v in ours.items()}}
    path = record_run("dreaming_profile", result, str(dev))
    print(json.dumps(result, indent=1))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
