"""Steered vs unsteered generation speed on the embedded default, side by side in one run.

* ``hf_generate``: transformers' ``generate`` for one unsteered row (the reference speed);
* ``plain``: this project's token loop for one unsteered row;
* ``steered``: the same loop with the starter clamp installed (SAE encode + decode per token);
* ``pair``: baseline and steered as one batch of two rows (what the Steering page runs).

Also counts the starter latent's words in baseline vs steered text over a few seeds.

    python benchmarks/steering_speed.py [--tokens 48] [--repeats 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from core.models import ModelSpec, load_model  # noqa: E402
from core.saes import SaeSpec, load_sae  # noqa: E402
from core.steering import GenConfig, Recipe, generate_steered  # noqa: E402
from core.text import tokenize  # noqa: E402
from ui.steering_view import STARTER, STARTER_PROMPT, STARTER_SAE  # noqa: E402

WORD = re.compile(r"\b(small|smaller|smallest|tiny|little)\b", re.IGNORECASE)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    lm = load_model(ModelSpec("embedded", device=args.device))
    sae = load_sae(SaeSpec("embedded", STARTER_SAE), lm)
    # A clamp that never lets generation stop early (eos) changes nothing about the timing:
    # greedy, fixed token count.
    cfg = GenConfig(max_new_tokens=args.tokens, temperature=0.0)
    batch = tokenize(lm, [STARTER_PROMPT])

    def hf() -> int:
        with torch.no_grad():
            out = lm.model.generate(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                                    max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                    do_sample=False, pad_token_id=lm.tokenizer.pad_token_id)
        return out.shape[1] - batch.input_ids.shape[1]

    def tokens(sae_, recipes) -> int:
        return sum(map(len, generate_steered(lm, sae_, STARTER_PROMPT, recipes, cfg).rows))

    runs = {
        "hf_generate": hf,
        "plain": lambda: tokens(None, [None]),
        "steered": lambda: tokens(sae, [STARTER]),
        "pair": lambda: tokens(sae, [None, STARTER]),
    }
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for name, fn in runs.items():  # warm-up
        fn()
    for _ in range(args.repeats):  # interleaved, so drift hits every variant alike
        for name, fn in runs.items():
            t = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t))
    med = {k: statistics.median(v) for k, v in rates.items()}
    words = {"baseline": 0, "steered": 0}
    prompts = [STARTER_PROMPT, "The weather today is", "My grandfather told me a story about"]
    for seed, prompt in enumerate(prompts):
        res = generate_steered(lm, sae, prompt, [None, STARTER],
                               GenConfig(max_new_tokens=32, temperature=0.7, seed=seed))
        words["baseline"] += len(WORD.findall(res.texts[0]))
        words["steered"] += len(WORD.findall(res.texts[1]))
    print(json.dumps({
        "device": str(lm.device), "tokens": args.tokens,
        "tokens_per_second": {k: round(v, 1) for k, v in med.items()},
        "steered_over_plain": round(med["steered"] / med["plain"], 3),
        "plain_over_hf_generate": round(med["plain"] / med["hf_generate"], 3),
        "pair_rows_per_second_over_plain": round(med["pair"] / med["plain"], 3),
        "starter_words_in_3x32_tokens": words, "recipe": Recipe.to_dict(STARTER),
    }, indent=1))


if __name__ == "__main__":
    main()
