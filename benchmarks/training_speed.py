"""Training throughput: the activation stream alone, and stream + training all four widths, each
against a bare forward pass to the hook on the same kind of windows, in one run.

The bare forward is the ceiling: what the model alone costs for the tokens the SAEs train on.
Goal on a GPU: stream + training >= 0.5x the bare forward. Needs the corpus (`train.tokens.u32`,
written by `python -m core.pipeline.corpus`). With `--samples N` it also times the corpus builder's
`samples` source (the model writing N tokens of its own text, batched). On a GPU it also counts
the host syncs of 64 training steps (CUDA's sync debug mode) and where they happen. On any
device it counts the operations one training step of all widths dispatches.

    python benchmarks/training_speed.py --corpus ~/.cache/sae-workbench/corpus [--device cuda]
        [--batch-tokens 4096,8192,16384]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import dispatch_counter, save  # noqa: E402
from core.pipeline.corpus import model_samples, stream_windows, token_stream  # noqa: E402
from core.hooks import run_to_hooks  # noqa: E402
from core.models import ModelSpec, load_model  # noqa: E402
from core.pipeline.training import TrainConfig, fit_family, stream  # noqa: E402


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward(lm, cfg: TrainConfig, tokens: int) -> float:
    """Tokens/s (BOS excluded) of forward passes to the hook alone, ids already on the device."""
    ids = token_stream(Path(cfg.corpus_dir) / "train.jsonl")
    rows = stream_windows(ids, lm.tokenizer.bos_token_id, cfg.context_size, tokens)
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(1))]
    batches = [b.to(lm.device) for b in rows.split(cfg.windows_per_forward)]
    run_to_hooks(lm, [cfg.hook_name], batches[0])  # warm-up
    sync(lm.device)
    start = time.perf_counter()
    for batch in batches:
        run_to_hooks(lm, [cfg.hook_name], batch)
    sync(lm.device)
    counted = int((rows != lm.tokenizer.bos_token_id).sum())
    return counted / (time.perf_counter() - start)


def stream_alone(lm, cfg: TrainConfig, tokens: int) -> float:
    batches = stream(cfg, lm)
    next(batches)  # warm-up: the first harvest fills the buffer
    sync(lm.device)
    start, seen = time.perf_counter(), 0
    while seen < tokens:
        seen += next(batches).shape[0]
    sync(lm.device)
    return seen / (time.perf_counter() - start)


def stream_and_training(lm, cfg: TrainConfig, tokens: int) -> float:
    """The whole job a user waits for: ``fit_family`` on ``tokens`` tokens, all widths."""
    cfg = replace(cfg, training_tokens=tokens)
    sync(lm.device)
    start = time.perf_counter()
    fit_family(cfg, lm)
    sync(lm.device)
    return tokens / (time.perf_counter() - start)


def ops_per_step(lm, cfg: TrainConfig, steps: tuple[int, int] = (4, 12)) -> float:
    """Operations dispatched per training step of all widths (each a kernel launch on a GPU),
    counted with a ``TorchDispatchMode``: ``fit_family`` on random activations for two numbers
    of steps, the difference divided by the steps between them (start-up cancels out). On a CPU
    Adam and gradient clipping run tensor by tensor; on a GPU their foreach versions dispatch
    fewer."""
    counts = []
    for n in steps:
        gen = torch.Generator(device=lm.device).manual_seed(0)
        batches = iter(lambda: torch.randn(cfg.batch_tokens, lm.d_model, device=lm.device,
                                           generator=gen), None)
        with dispatch_counter() as count:
            fit_family(replace(cfg, training_tokens=n * cfg.batch_tokens), lm, batches)
        counts.append(count.total)
    return (counts[1] - counts[0]) / (steps[1] - steps[0])


def host_syncs(lm, cfg: TrainConfig, steps: int = 64) -> dict | None:
    """On a GPU, the host syncs of ``steps`` training steps (``fit_family`` on that many batches,
    its start included), counted by CUDA's sync debug mode and grouped by where they happen;
    ``None`` on a CPU, where nothing waits."""
    if lm.device.type != "cuda":
        return None
    import warnings
    from collections import Counter

    cfg = replace(cfg, training_tokens=steps * cfg.batch_tokens)
    where: Counter = Counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fit_family(cfg, lm)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for w in caught:
        if "synchroniz" in str(w.message):
            where[f"{Path(w.filename).name}:{w.lineno}"] += 1
    return {"steps": steps, "syncs": sum(where.values()), "by_line": dict(where.most_common(20))}


def sampling(lm, tokens: int, length: int = 192) -> dict:
    """Tokens/s of the corpus's ``samples`` source (default batch for the device), and of the
    same batches sampled by transformers' own warpers (``generate(top_k=50, top_p=0.95)``, what a
    user of the library would write), batch by batch in turns, same prompts and seeds. Both
    keep the same tokens at each step, so the texts should match; ``same_texts`` says how many
    do."""
    import random

    from core.pipeline.corpus import OPENINGS
    from core.text import tokenize

    batch = 512 if lm.device.type == "cuda" else 32
    ours = model_samples(lm, tokens, seed=0, batch=batch, length=length)
    rng = random.Random(0)
    took = {"ours": 0.0, "transformers": 0.0}
    made = {"ours": 0, "transformers": 0}
    same = total = step = 0
    while made["ours"] < tokens:
        prompts = [rng.choice(OPENINGS) for _ in range(batch)]
        sync(lm.device)
        start = time.perf_counter()
        texts = [next(ours).text for _ in range(batch)]  # the source yields a batch at once
        sync(lm.device)
        took["ours"] += time.perf_counter() - start
        torch.manual_seed(step)  # model_samples' seed for batch `step` (seed 0)
        ids = tokenize(lm, prompts, padding_side="left")
        sync(lm.device)
        start = time.perf_counter()
        with lm.lock, torch.no_grad():
            out = lm.model.generate(input_ids=ids.input_ids, attention_mask=ids.attention_mask,
                                    max_new_tokens=length, do_sample=True, temperature=1.0,
                                    top_k=50, top_p=0.95, pad_token_id=lm.tokenizer.pad_token_id)
        theirs = [p + t for p, t in zip(prompts, lm.tokenizer.batch_decode(
            out[:, ids.input_ids.shape[1]:], skip_special_tokens=True))]
        sync(lm.device)
        took["transformers"] += time.perf_counter() - start
        for name, docs in (("ours", texts), ("transformers", theirs)):
            made[name] += sum(len(lm.tokenizer(d, add_special_tokens=False)["input_ids"])
                              for d in docs)
        same += sum(a == b for a, b in zip(texts, theirs))
        total += batch
        step += 1
    rates = {k: made[k] / took[k] for k in took}
    return {"batch": batch, "length": length, "batches": step,
            "tokens_per_s": round(rates["ours"]),
            "transformers_top_p_tokens_per_s": round(rates["transformers"]),
            "ratio": round(rates["ours"] / rates["transformers"], 2),
            "same_texts": f"{same} of {total}"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tokens", type=int, default=0,
                        help="tokens per measurement (default: 2M on CUDA, 32k on the CPU)")
    parser.add_argument("--batch-tokens", default="",
                        help="comma-separated training batch sizes, each timed (default: "
                             "TrainConfig's; the shipped family used 8192)")
    parser.add_argument("--samples", type=int, default=0,
                        help="also time the model writing this many tokens of samples")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    lm = load_model(ModelSpec("embedded", device=args.device))
    gpu = lm.device.type == "cuda"
    tokens = args.tokens or (2_000_000 if gpu else 32_768)
    # the defaults on a GPU; on a CPU smaller harvests, so the buffer fills within the run
    cfg = TrainConfig(corpus_dir=args.corpus) if gpu else TrainConfig(
        corpus_dir=args.corpus, windows_per_forward=16, shuffle_tokens=16_384, norm_batches=2)
    torch.manual_seed(0)
    np.random.seed(0)
    forward_tps = bare_forward(lm, cfg, tokens)
    stream_tps = stream_alone(lm, cfg, tokens)
    sizes = [int(b) for b in args.batch_tokens.split(",") if b.strip()] or [cfg.batch_tokens]
    by_batch = {b: stream_and_training(lm, replace(cfg, batch_tokens=b), tokens) for b in sizes}
    train_tps = by_batch[sizes[0]]
    result = {
        "tokens_per_measurement": tokens, "widths": list(cfg.widths),
        "model_dtype": str(lm.dtype), "windows_per_forward": cfg.windows_per_forward,
        "shuffle_tokens": cfg.shuffle_tokens, "norm_batches": cfg.norm_batches,
        "batch_tokens": sizes[0],
        "tokens_per_s": {"bare_forward": round(forward_tps), "stream": round(stream_tps),
                         "stream_and_training": round(train_tps)},
        "ratio_to_bare_forward": {"stream": round(stream_tps / forward_tps, 3),
                                  "stream_and_training": round(train_tps / forward_tps, 3)},
        "goal": "stream + training >= 0.5x the bare forward (GPU)",
    }
    if len(sizes) > 1:
        result["stream_and_training_by_batch_tokens"] = {
            str(b): {"tokens_per_s": round(v), "ratio_to_bare_forward": round(v / forward_tps, 3)}
            for b, v in by_batch.items()}
    result["ops_per_training_step"] = ops_per_step(lm, cfg)
    syncs = host_syncs(lm, cfg)
    if syncs is not None:
        result["host_syncs"] = syncs
    if args.samples:
        result["samples"] = sampling(lm, args.samples)
    save("training_speed", result, str(lm.device))


if __name__ == "__main__":
    main()
