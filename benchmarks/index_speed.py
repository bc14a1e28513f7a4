"""Index build throughput against the bare forward pass to the hook layer, and page-data latency.

Both passes read the same windows in one run, so the ratio holds on any machine. Goals: build
throughput >= 0.8 x bare forward; one latent's page data from the index in <= 150 ms.

    python benchmarks/index_speed.py [--tokens 16384] [--sae embedded:w4096] [--model embedded]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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

    marks = {}

    def progress(fraction: float, message: str) -> None:
        if fraction >= 0.85 and "stream_end" not in marks:
            marks["stream_end"] = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.duckdb"
        start = time.perf_counter()
        build_index(lm, saes, corpus, path,
                    IndexConfig(context_size=args.context, max_tokens=n_tokens,
                                batch_windows=batch), progress=progress)
        total = time.perf_counter() - start
        stream = marks.get("stream_end", start + total) - start
        index = FeatureIndex(path)
        name = next(iter(saes))
        latents = random.Random(0).sample(range(index.d_sae(name)), 100)
        times = []
        for latent in latents:
            t = time.perf_counter()
            index.latent(name, latent)
            times.append(1000 * (time.perf_counter() - t))
    result = {
        "device": str(lm.device), "model": lm.name, "saes": {k: s.d_sae for k, s in saes.items()},
        "tokens": n_tokens,
        "bare_forward_tokens_per_s": round(bare),
        "index_stream_tokens_per_s": round(n_tokens / stream),
        "ratio": round(n_tokens / stream / bare, 3), "ratio_goal": 0.8,
        "index_total_s": round(total, 1), "weights_and_write_s": round(total - stream, 1),
        "latent_page_ms_median": round(statistics.median(times), 1),
        "latent_page_ms_p95": round(sorted(times)[94], 1), "latent_page_goal_ms": 150,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
