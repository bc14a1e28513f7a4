"""Index build: the whole job a user waits for (streaming, logit-lens and neighbour tables, the
rows, the activations stored around every shown example, the DuckDB write) against the bare
forward pass to the hook layer over the same windows, in one run, so the ratio holds on any
machine. Goal: build throughput >= 0.8 x bare forward for the streaming part; the whole build
is reported beside it, with the share of each stage.

    python benchmarks/index_speed.py [--tokens 16384] [--sae embedded:w4096] [--model embedded]

The Lookup page's latency (click to rendered) is measured by benchmarks/lookup_page.py.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import save  # noqa: E402

import torch  # noqa: E402

from core.hooks import run_to_hooks  # noqa: E402
from core.index import IndexConfig, build_index  # noqa: E402
from core.feature_index import FeatureIndex  # noqa: E402
from core.models import load_model, parse_model_param  # noqa: E402
from core.saes import LoadedSAE, SaeProcessing, SaeSpec, embedded_saes, load_sae, parse_sae_param  # noqa: E402
from core.text import windows  # noqa: E402


def random_sae(lm, width: int, hook: str) -> LoadedSAE:
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=lm.d_model, d_sae=width,
                                        metadata=SAEMetadata(hook_name=hook, model_name=lm.name)))
    with torch.no_grad():
        sae.W_enc.normal_(0, lm.d_model ** -0.5)
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(width, lm.d_model), dim=1))
        sae.threshold.fill_(2.5)
    return LoadedSAE(sae.eval(), SaeSpec("local", "random"), hook, SaeProcessing(False, True),
                     None)


def texts(n: int) -> list[str]:
    words = (Path(torch.__file__).parent / "functional.py").read_text().split()
    rng = random.Random(0)
    return [" ".join(rng.choice(words) for _ in range(400)) for _ in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--sae", action="append", default=None)
    parser.add_argument("--tokens", type=int, default=16_384)
    parser.add_argument("--context", type=int, default=128)
    args = parser.parse_args()
    lm = load_model(parse_model_param(args.model))
    if args.sae:
        saes = {v: load_sae(parse_sae_param(v), lm) for v in args.sae}
    elif args.model == "embedded" and embedded_saes():
        saes = {n: load_sae(SaeSpec("embedded", n), lm) for n in embedded_saes()}
    else:
        saes = {"random4096": random_sae(lm, 4096, "blocks.12.hook_resid_post")}
    hook = next(iter(saes.values())).hook_name
    corpus = texts(args.tokens // 300 + 8)
    rows = list(windows(lm, iter(corpus), args.context))[: args.tokens // args.context]
    n_tokens = len(rows) * args.context
    batch = 16

    run_to_hooks(lm, [hook], torch.tensor(rows[:2], device=lm.device))  # warm-up
    start = time.perf_counter()
    for i in range(0, len(rows), batch):
        run_to_hooks(lm, [hook], torch.tensor(rows[i:i + batch], device=lm.device))
    bare = n_tokens / (time.perf_counter() - start)

    marks: dict[str, float] = {}

    def progress(fraction: float, message: str) -> None:
        stage = ("stream" if fraction < 0.6 else "tables" if fraction < 0.7 else
                 "shown_spans" if fraction < 0.92 else "write")
        marks.setdefault(stage, time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.duckdb"
        start = time.perf_counter()
        build_index(lm, saes, corpus, path,
                    IndexConfig(context_size=args.context, max_tokens=n_tokens,
                                batch_windows=batch), progress=progress)
        end = time.perf_counter()
        size = path.stat().st_size
        index = FeatureIndex(path)
        assert index.saes == list(saes)
    stages = ["stream", "tables", "shown_spans", "write"]
    begin = {k: marks.get(k, end) for k in stages}
    begin["stream"] = start
    seconds = {k: round((begin[stages[i + 1]] if i + 1 < len(stages) else end) - begin[k], 1)
               for i, k in enumerate(stages)}
    total = end - start
    figures = {
        "model": lm.name, "saes": {k: s.d_sae for k, s in saes.items()}, "tokens": n_tokens,
        "bare_forward_tokens_per_s": round(bare),
        "stream_tokens_per_s": round(n_tokens / seconds["stream"]),
        "stream_ratio": round(n_tokens / seconds["stream"] / bare, 3), "stream_ratio_goal": 0.8,
        "whole_build_s": round(total, 1),
        "whole_build_tokens_per_s": round(n_tokens / total),
        "whole_build_ratio": round(n_tokens / total / bare, 3),
        "stage_seconds": seconds, "index_bytes": size,
    }
    save("index_speed", figures, device=str(lm.device))


if __name__ == "__main__":
    main()
