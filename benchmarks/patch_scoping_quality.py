"""Does patch scoping on the embedded 270M base model name what a latent means?

Picks the w4096 latents whose meaning is obvious from their top tokens: at least 80% of their top
activating examples sit on one whole word (a token starting with a space, letters only, 4
characters or more, case ignored), firing on at most 1% of tokens; the ``--n`` with the most top
examples on that word (then the highest max activation), one latent per word. For each, runs the project's patch scoping (``core.patch_scoping``, the base
prompt, greedy) at the SAE's own hook and at an earlier layer, each with norms 0.5×, 1×, 2× and
4× the typical activation norm at that hook, and counts the outputs that name the word: the
output contains its first (up to) five letters, case ignored. A strict, mechanical test; the
README also says what the outputs read like. The unpatched continuation (the bare placeholder)
is kept too, to tell outputs the patch changed from the prompt's default answer.

    nice -n 5 python benchmarks/patch_scoping_quality.py [--n 10] [--tokens 12] [--early 4]
"""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import arguments, parse, save  # noqa: E402

from core.feature_index import EMBEDDED_INDEX, open_index  # noqa: E402
from core.models import ModelSpec, load_model  # noqa: E402
from core.patch_scoping import (  # noqa: E402
    ScopeConfig,
    cut,
    patch_scope,
    prompt_with_positions,
    typical_norm,
)
from core.steering import GenConfig, generate_rows  # noqa: E402
from core.saes import SaeSpec, load_sae  # noqa: E402

FACTORS = (0.5, 1.0, 2.0, 4.0)


def obvious_latents(index, name: str, tokenizer, n: int) -> list[tuple[int, str, float]]:
    """(latent, word, share of top examples on it), the ``n`` clearest."""
    table = index.summary(name).set_index("latent")
    tokens = index.sequence_count() * (index.context_size - 1)
    per: dict[int, Counter] = {}
    for latent, tok, count in index.top_token_counts(name):
        text = tokenizer.decode([tok])
        word = text.strip().lower() if text.startswith(" ") else ""  # a whole word, not a piece
        per.setdefault(latent, Counter())[word] += count
    picks = []
    for latent, counter in per.items():
        word, top = counter.most_common(1)[0]
        total = sum(counter.values())
        rate = table.loc[latent, "firing_count"] / tokens
        if word.isalpha() and len(word) >= 4 and top / total >= 0.8 and rate <= 0.01:
            picks.append((top, float(table.loc[latent, "max_act"]), latent, word, top / total))
    picks.sort(reverse=True)
    out, words = [], set()
    for _, _, latent, word, share in picks:
        if word not in words:  # one latent per word
            out.append((latent, word, share))
            words.add(word)
    return out[:n]


class Unpatched:
    """No hook in any pass: what the model says about the bare placeholder."""

    def hooks(self) -> dict:
        return {}

    def advance(self, n: int) -> None:
        pass


def baseline(lm, sae, cfg: ScopeConfig) -> str:
    ids, _ = prompt_with_positions(lm, cfg, sae.processing.prepend_bos)
    out: list = []
    for _ in generate_rows(lm, ids, 1, Unpatched(), GenConfig(cfg.max_new_tokens, 0.0), out):
        pass
    return cut(lm.tokenizer.decode(out[0][0][0], skip_special_tokens=True), cfg)


def names(text: str, word: str) -> bool:
    return word[:5].lower() in text.lower()


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--n", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--early", type=int, default=4, help="the earlier layer to patch")
    parser.add_argument("--sae", default="w4096")
    args = parse(parser)
    lm = load_model(ModelSpec("embedded", device=args.device))
    sae = load_sae(SaeSpec("embedded", args.sae), lm)
    index = open_index(EMBEDDED_INDEX)
    chosen = obvious_latents(index, args.sae, lm.tokenizer, args.n)
    hooks = [sae.hook_name, f"blocks.{args.early}.hook_resid_post"]
    start = time.perf_counter()
    unpatched = baseline(lm, sae, ScopeConfig(norms=(1.0,), max_new_tokens=args.tokens))
    print(f"unpatched: {unpatched}", file=sys.stderr)
    runs = {}
    for hook in hooks:
        base = ScopeConfig(hook=hook, norms=(1.0,), max_new_tokens=args.tokens)
        typical = typical_norm(lm, sae, base)
        norms = tuple(float(f"{f * typical:.3g}") for f in FACTORS)
        cfg = ScopeConfig(hook=hook, norms=norms, max_new_tokens=args.tokens)
        rows = []
        for latent, word, share in chosen:
            res = patch_scope(lm, sae, latent, cfg)
            hits = [names(t, word) for t in res.texts]
            rows.append({"latent": latent, "word": word, "top_share": round(share, 2),
                         "outputs": dict(zip(map(str, norms), res.texts)), "named": hits})
            print(f"{hook} #{latent} ({word}): {res.texts}", file=sys.stderr)
        runs[hook] = {
            "typical_norm": typical, "norms": norms,
            "latents_named_at_any_norm": sum(any(r["named"]) for r in rows),
            "named_per_norm": [sum(r["named"][i] for r in rows) for i in range(len(norms))],
            "distinct_outputs": len({t for r in rows for t in r["outputs"].values()}),
            "outputs_equal_to_unpatched": sum(t == unpatched for r in rows
                                              for t in r["outputs"].values()),
            "rows": rows,
        }
    save("patch_scoping_quality", {
        "sae": args.sae, "latents": len(chosen), "norm_factors": FACTORS,
        "max_new_tokens": args.tokens, "prompt": "core.patch_scoping.BASE_PROMPT",
        "criterion": "output contains the word's first five letters, case ignored",
        "unpatched_output": unpatched,
        "seconds": round(time.perf_counter() - start, 1), "runs": runs,
    }, device=args.device)


if __name__ == "__main__":
    main()
