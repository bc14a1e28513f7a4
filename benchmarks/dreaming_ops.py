"""Operations core.dreaming dispatches per iteration on its CUDA path, for the code of any
checkout of this project, so a GPU figure taken with older code can be set against today's.

``--root`` names the checkout whose ``core`` is imported (default: this one), e.g. a git worktree
of the commit a GPU run recorded (``git worktree add /tmp/old COMMIT``). The loop takes the path
it takes on CUDA, whatever the device: whole passes (no packing) and CUDA's budgets in
``core.dream_passes`` (those the checkout has). Counted with a ``TorchDispatchMode``, on the
embedded model, with ``dreaming_overhead.py``'s settings: each operation a kernel launch on a
GPU, where this model's iteration is short on arithmetic.

    python benchmarks/dreaming_ops.py [--root DIR] [--latent 273] [--iters 8] [--seeds 0 1 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=HERE.parent,
                        help="the checkout whose core.dreaming is counted")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sae", default="w4096")
    parser.add_argument("--latent", type=int, default=273)
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--explore", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--graphs", action="store_true",
                        help="take core.graphs' CUDA-graph path too (where the checkout has it): "
                             "a replay counts as one launch, a capture as its warm-up and "
                             "recording runs")
    args = parser.parse_args()
    root = args.root.resolve()
    if not (root / "core" / "dreaming.py").exists():
        sys.exit(f"{root} holds no core/dreaming.py: name a checkout of this project.")
    sys.path[:0] = [str(HERE), str(root)]  # this folder's record.py, the checkout's core

    import torch

    from record import dispatch_counter, save
    from core import dream_passes
    from core.dreaming import DreamConfig, Objective, dream
    from core.models import ModelSpec, load_model
    from core.saes import SaeSpec, load_sae

    if args.threads:
        torch.set_num_threads(args.threads)
    kind = torch.device(args.device).type
    budgets = [name for name in ("TOKEN_BUDGET", "LOGIT_BUDGET", "VOCAB_SLICE", "HIDDEN_BUDGET")
               if hasattr(dream_passes, name)]
    for name in budgets:
        table = getattr(dream_passes, name)
        table[kind] = table["cuda"]
    if hasattr(dream_passes, "set_pack_tokens"):
        dream_passes.set_pack_tokens(kind, 0)

    counters: list = []  # the counter of the seed being run
    if args.graphs:
        if not (root / "core" / "graphs.py").exists():
            sys.exit(f"{root} has no core/graphs.py: drop --graphs for that checkout.")
        from core import graphs
        graphs.GRAPH_TOKENS[kind] = graphs.GRAPH_TOKENS["cuda"]
        if kind != "cuda":
            graphs.CAPTURE[kind] = one_launch(counters, graphs.WARMUP)

    lm = load_model(ModelSpec(device=args.device))
    sae = load_sae(SaeSpec("embedded", args.sae), lm)
    objective = Objective.sae_latent(sae, args.latent)
    runs = []
    for seed in args.seeds:
        cfg = DreamConfig(iters=args.iters, seed=seed, explore=args.explore, buffer_size=8,
                          min_tokens=4, max_tokens=args.max_tokens, xe_regularization=0.3,
                          p_gcg=0.25, p_insert=0.25, p_swap=0.25, p_delete=0.25, sample_k2=16,
                          gcg_topk=512, init_prompt="The weather today is")
        count = dispatch_counter()
        counters[:] = [count]
        steps = dream(lm, objective, cfg)
        next(steps)  # the start is not an iteration
        rows = []
        while True:
            before = count.total
            with count:
                step = next(steps, None)
            if step is None:
                break
            rows.append({"op": step.op, "ops": count.total - before})
        runs.append({"seed": seed, "iterations": rows, "top_ops": count.by_op.most_common(10)})
        print(json.dumps(runs[-1]), flush=True)
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = ""
    every = [r["ops"] for run in runs for r in run["iterations"]]
    figures = {"root": root.name, "root_commit": commit, "model": lm.name, "sae": args.sae,
               "latent": args.latent, "cuda_budgets_taken": budgets,
               "packing_off": hasattr(dream_passes, "set_pack_tokens"),
               "graphs": args.graphs,
               "params": {k: getattr(args, k) for k in ("iters", "explore", "max_tokens",
                                                        "seeds")},
               "ops_per_iteration_median": statistics.median(every),
               "ops_per_iteration_range": [min(every), max(every)], "runs": runs}
    save("dreaming_ops", figures, str(lm.device))


def one_launch(counters: list, warmup: int):
    """A stand-in for a CUDA graph capture on a device that has none: the pass runs as a
    capture runs it (``warmup`` times, then once more to be recorded), and each replay runs it
    again uncounted and counts as the one launch a CUDA graph replay is."""
    from torch.utils._python_dispatch import _disable_current_modes

    def capture(fn):
        for _ in range(warmup):
            fn()
        out = fn()

        def replay():
            with _disable_current_modes():
                for static, new in zip(out, fn()):
                    static.copy_(new)
            if counters:
                counters[0].total += 1
                counters[0].by_op["cuda graph replay"] += 1

        return replay, out

    return capture


if __name__ == "__main__":
    main()
