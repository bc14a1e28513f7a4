"""Which latents fire on 4-25% of tokens (the bump near 10% in the card's density plot), and
where: position in the window, right after a document separator, on which tokens; and whether
they are the same directions across widths.

    python benchmarks/density_bump.py --corpus ~/.cache/sae-workbench/corpus [--tokens 30000]

Rates come from the shipped index (the card's counts once it holds them); positions and tokens
from a fresh pass over the corpus's unseen split. Writes its JSON to results/.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import save  # noqa: E402
from core.feature_index import EMBEDDED_INDEX, FeatureIndex  # noqa: E402
from core.hooks import run_to_hooks  # noqa: E402
from core.models import ModelSpec, load_model  # noqa: E402
from core.pipeline.corpus import stream_windows, token_stream  # noqa: E402
from core.saes import SaeSpec, load_sae, sae_input  # noqa: E402

LOW, HIGH, EARLY = 0.04, 0.25, 16


def profile(lm, s, rows, bump: torch.Tensor) -> list[dict]:
    bos = lm.tokenizer.bos_token_id
    n = len(bump)
    early, after_sep, total = torch.zeros(n), torch.zeros(n), torch.zeros(n)
    tokens = [collections.Counter() for _ in range(n)]
    for chunk in rows.split(16):
        x = run_to_hooks(lm, [s.hook_name], chunk)[s.hook_name]
        fires = s.sae.encode(sae_input(s, x).to(s.sae.dtype))[..., bump] > 0
        fires[chunk == bos] = False
        sep = torch.zeros_like(chunk, dtype=torch.bool)
        sep[:, 2:] = chunk[:, 1:-1] == bos  # the token after a separator (not the window's BOS)
        early += fires[:, 1:EARLY + 1].float().sum((0, 1))
        after_sep += (fires & sep.unsqueeze(-1)).float().sum((0, 1))
        total += fires.float().sum((0, 1))
        for j in range(n):
            b, p = torch.nonzero(fires[..., j], as_tuple=True)
            tokens[j].update(chunk[b, p].tolist())
    out = []
    for j, latent in enumerate(bump.tolist()):
        t = max(total[j].item(), 1.0)
        top = [(lm.tokenizer.decode([k]), round(c / t, 3)) for k, c in tokens[j].most_common(3)]
        out.append({"latent": latent, "share_positions_1_16": round(early[j].item() / t, 3),
                    "share_after_separator": round(after_sep[j].item() / t, 4),
                    "top_tokens": top})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--corpus", type=Path, required=True)
    parser.add_argument("--index", type=Path, default=EMBEDDED_INDEX)
    parser.add_argument("--tokens", type=int, default=30_000)
    parser.add_argument("--widths", nargs="+", default=["w512", "w4096"])
    args = parser.parse_args()
    lm = load_model(ModelSpec("embedded"))
    index = FeatureIndex(args.index)
    rows = stream_windows(token_stream(args.corpus / "unseen.jsonl"), lm.tokenizer.bos_token_id,
                          128, args.tokens)
    body = rows[:, 1:] != lm.tokenizer.bos_token_id
    expected_early = body[:, :EARLY].float().sum().item() / body.float().sum().item()
    result, directions = {"tokens": int(body.sum()), "expected_share_positions_1_16":
                          round(expected_early, 3), "widths": {}}, {}
    for name in args.widths:
        s = load_sae(SaeSpec("embedded", name), lm)
        table = index.summary(name)
        stats = index.sae_stats(name)
        rate = torch.tensor(table["firing_rate"].to_numpy())
        bump = torch.nonzero((rate > LOW) & (rate < HIGH)).flatten()
        rows_out = profile(lm, s, rows, bump)
        directions[name] = torch.nn.functional.normalize(s.sae.W_dec[bump].float(), dim=1)
        result["widths"][name] = {
            "rates_counted_on_tokens": int(stats["density_tokens"]), "bump_latents": len(bump),
            "median_share_positions_1_16": statistics.median(
                r["share_positions_1_16"] for r in rows_out),
            "median_share_after_separator": statistics.median(
                r["share_after_separator"] for r in rows_out),
            "median_top_token_share": statistics.median(
                r["top_tokens"][0][1] for r in rows_out if r["top_tokens"]),
            "latents": rows_out}
    if len(directions) >= 2:
        a, b = directions[args.widths[-1]], directions[args.widths[0]]
        best = (a @ b.T).max(1).values
        result["same_directions_across_widths"] = {
            "median_max_cosine": round(best.median().item(), 3),
            "share_above_0.9": round((best > 0.9).float().mean().item(), 3)}
    save("density_bump", result, "cpu")


if __name__ == "__main__":
    main()
