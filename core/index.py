"""The feature index: per-latent dashboard data for a family of SAEs, in one DuckDB file.

Built once per (model, SAEs, corpus) by streaming the corpus through the model and the SAEs:

* per latent, from activations: exact top-k activating tokens, firing rate, max and mean
  activation, a histogram of non-zero activations and samples from equal-width activation
  intervals (as sae_dashboard does), both from a uniform sample of firing tokens;
* per latent, from weights: logit-lens top promoted / suppressed tokens (decoder direction times
  the final norm's gain, then the unembedding), nearest latents by decoder cosine, and the cosine
  between the latent's encoder and decoder directions;
* per SAE: L0, FVE, dead and dense counts, the log10 firing-rate histogram.

The corpus's token ids are stored once (``sequences``); examples are (sequence, position, value).
Per-token activations inside a context window are recomputed on demand (one short forward pass).

A build writes to ``<path>.partial`` and moves it into place only when complete, so an interrupted
build leaves the previous index intact.

    python -m core.index --sae embedded:w512 --sae embedded:w4096 --corpus heldout.jsonl \\
        --tokens 500000 --out data/index/embedded.duckdb
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from core.density import is_dead, is_dense, load_firing_counts, log10_density
from core.hooks import run_to_hooks
from core.models import LoadedModel, Progress, log_progress
from core.saes import LoadedSAE, ReconstructionStats, sae_input
from core.text import windows

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class IndexConfig:
    """How much to read and keep."""

    context_size: int = 128
    """Tokens per window (each starts with BOS; BOS positions never count as firing)."""
    max_tokens: int = 500_000
    top_k: int = 24
    """Top activating examples kept per latent."""
    n_sample: int = 256
    """Uniform sample of firing tokens per latent (for the histogram and interval samples)."""
    n_intervals: int = 8
    per_interval: int = 4
    hist_bins: int = 24
    n_logits: int = 10
    n_neighbours: int = 10
    batch_windows: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.context_size < 4 or self.max_tokens < self.context_size:
            raise ValueError(f"context_size={self.context_size} and max_tokens="
                             f"{self.max_tokens} leave nothing to index.")
        if min(self.top_k, self.n_sample, self.n_intervals, self.per_interval) < 1:
            raise ValueError("top_k, n_sample, n_intervals and per_interval must be >= 1.")


@dataclass
class _Running:
    """Streaming statistics for one SAE."""

    d_sae: int
    k: int
    n_sample: int
    total: torch.Tensor = field(init=False)
    maximum: torch.Tensor = field(init=False)
    top_val: torch.Tensor = field(init=False)
    top_pos: torch.Tensor = field(init=False)
    smp_key: torch.Tensor = field(init=False)
    smp_val: torch.Tensor = field(init=False)
    smp_pos: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        d = self.d_sae  # per-latent rows: [d_sae, k] so top-k runs along contiguous memory
        self.total = torch.zeros(d, dtype=torch.float64)
        self.maximum = torch.zeros(d)
        self.top_val = torch.zeros(d, self.k)
        self.top_pos = torch.full((d, self.k), -1, dtype=torch.long)
        self.smp_key = torch.full((d, self.n_sample), -1.0)
        self.smp_val = torch.zeros(d, self.n_sample)
        self.smp_pos = torch.full((d, self.n_sample), -1, dtype=torch.long)

    def update(self, feats: torch.Tensor, positions: torch.Tensor, gen: torch.Generator) -> None:
        """``feats`` [n, d_sae] (zero where not firing), ``positions`` [n] global token ids.

        Only firing entries are touched (an SAE fires on a few dozen latents per token): the
        batch's best ``k`` per latent and its ``n_sample`` highest random keys per latent are
        gathered from the non-zero entries, then merged with the running tables."""
        tok, lat = (feats > 0).nonzero(as_tuple=True)
        vals, pos = feats[tok, lat], positions[tok]
        self.total.index_add_(0, lat, vals.double())
        self.maximum.scatter_reduce_(0, lat, vals, "amax")
        touched = torch.unique(lat)  # most latents do not fire in a batch: leave their rows
        row = torch.searchsorted(touched, lat)
        top_val, (top_pos,) = _best_per_row(len(touched), self.k, row, vals, [pos], 0.0)
        best = torch.cat([self.top_val[touched], top_val], dim=1).topk(self.k, dim=1)
        self.top_pos[touched] = torch.cat([self.top_pos[touched], top_pos], 1).gather(
            1, best.indices)
        self.top_val[touched] = best.values
        keys = torch.rand(vals.shape, generator=gen)
        smp_key, (smp_val, smp_pos) = _best_per_row(len(touched), self.n_sample, row, keys,
                                                     [vals, pos], -1.0)
        pick = torch.cat([self.smp_key[touched], smp_key], dim=1).topk(self.n_sample, dim=1)
        self.smp_val[touched] = torch.cat([self.smp_val[touched], smp_val], 1).gather(
            1, pick.indices)
        self.smp_pos[touched] = torch.cat([self.smp_pos[touched], smp_pos], 1).gather(
            1, pick.indices)
        self.smp_key[touched] = pick.values


def _best_per_row(rows: int, cap: int, row: torch.Tensor, score: torch.Tensor,
                  payloads: list[torch.Tensor], empty: float
                  ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """For entries (``row``, ``score``): each row's ``cap`` highest scores as a ``[rows, cap]``
    table (``empty`` where a row has fewer), with the matching ``payloads`` (``-1`` there)."""
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(row[order], stable=True)]
    sorted_rows = row[order]
    counts = torch.bincount(sorted_rows, minlength=rows)
    rank = torch.arange(len(order)) - (torch.cumsum(counts, 0) - counts)[sorted_rows]
    keep = rank < cap
    at, r, r_rank = order[keep], sorted_rows[keep], rank[keep]
    table = torch.full((rows, cap), empty, dtype=score.dtype)
    table[r, r_rank] = score[at]
    out = []
    for p in payloads:
        t = torch.full((rows, cap), -1, dtype=p.dtype)
        t[r, r_rank] = p[at]
        out.append(t)
    return table, out


def _final_norm_gain(lm: LoadedModel, directions: torch.Tensor) -> torch.Tensor:
    """Directions through the final norm's gain (norm(d) - norm(0)), the logit-lens convention."""
    for path in ("model.norm", "transformer.ln_f", "model.language_model.norm"):
        try:
            norm = lm.model.get_submodule(path)
        except AttributeError:
            continue
        d = directions.to(lm.dtype).to(lm.device)
        return (norm(d) - norm(torch.zeros_like(d[:1]))).float()
    raise ValueError(f"No final norm found on {lm.architecture}; add its path in core/index.py.")


@torch.no_grad()
def weight_tables(lm: LoadedModel, s: LoadedSAE, n_logits: int, n_neighbours: int,
                  chunk: int = 512) -> dict[str, np.ndarray]:
    """Logit lens, nearest decoder neighbours and encoder–decoder cosine for every latent."""
    w_dec = s.sae.W_dec.float()
    w_u = lm.model.get_output_embeddings().weight
    pos_ids, pos_vals, neg_ids, neg_vals = [], [], [], []
    for start in range(0, w_dec.shape[0], chunk):
        dirs = _final_norm_gain(lm, w_dec[start:start + chunk])
        logits = (dirs.to(w_u.dtype) @ w_u.T).float()
        top = logits.topk(n_logits, dim=1)
        bottom = (-logits).topk(n_logits, dim=1)
        pos_ids.append(top.indices.cpu())
        pos_vals.append(top.values.cpu())
        neg_ids.append(bottom.indices.cpu())
        neg_vals.append(-bottom.values.cpu())
    unit = torch.nn.functional.normalize(w_dec, dim=1)
    nb_ids, nb_cos = [], []
    for start in range(0, unit.shape[0], chunk):
        cos = unit[start:start + chunk] @ unit.T
        cos[torch.arange(cos.shape[0]), torch.arange(start, start + cos.shape[0])] = -2.0
        top = cos.topk(min(n_neighbours, unit.shape[0] - 1), dim=1)
        nb_ids.append(top.indices.cpu())
        nb_cos.append(top.values.cpu())
    enc = torch.nn.functional.normalize(s.sae.W_enc.float().T, dim=1)
    enc_dec = (enc * unit).sum(1)
    return {
        "logit_pos_ids": torch.cat(pos_ids).numpy(), "logit_pos_vals": torch.cat(pos_vals).numpy(),
        "logit_neg_ids": torch.cat(neg_ids).numpy(), "logit_neg_vals": torch.cat(neg_vals).numpy(),
        "neighbour_ids": torch.cat(nb_ids).numpy(), "neighbour_cos": torch.cat(nb_cos).numpy(),
        "enc_dec_cos": enc_dec.cpu().numpy(),
    }


def _latent_rows(name: str, run: _Running, fires: torch.Tensor, density: tuple[torch.Tensor, int],
                 cfg: IndexConfig, weights: dict[str, np.ndarray],
                 rng: np.random.Generator) -> tuple[list, list, list]:
    """Rows for the latents, top_examples and interval_samples tables. ``fires`` count on the
    indexed tokens (for means); firing counts and rates come from ``density`` (counts, tokens)."""
    latents, tops, intervals = [], [], []
    count, n_tokens = density[0].numpy(), density[1]
    mean = (run.total / fires.clamp(min=1)).numpy()
    top_val, top_pos = run.top_val.T.numpy(), run.top_pos.T.numpy()
    smp_val, smp_pos = run.smp_val.T.numpy(), run.smp_pos.T.numpy()
    for i in range(run.d_sae):
        mx = float(run.maximum[i])
        sample = smp_val[:, i][smp_pos[:, i] >= 0]
        edges = np.linspace(0, mx, cfg.hist_bins + 1) if mx > 0 else np.zeros(cfg.hist_bins + 1)
        hist = np.histogram(sample, bins=edges)[0] if mx > 0 else np.zeros(cfg.hist_bins, int)
        latents.append({
            "sae": name, "latent": i, "firing_count": int(count[i]),
            "firing_rate": float(count[i]) / n_tokens, "max_act": mx,
            "mean_act": float(mean[i]), "hist_counts": hist.astype(int).tolist(),
            "hist_max": mx, "sample_size": int(len(sample)),
            "enc_dec_cos": float(weights["enc_dec_cos"][i]),
            "logit_pos_ids": weights["logit_pos_ids"][i].tolist(),
            "logit_pos_vals": weights["logit_pos_vals"][i].tolist(),
            "logit_neg_ids": weights["logit_neg_ids"][i].tolist(),
            "logit_neg_vals": weights["logit_neg_vals"][i].tolist(),
            "neighbour_ids": weights["neighbour_ids"][i].tolist(),
            "neighbour_cos": weights["neighbour_cos"][i].tolist(),
        })
        for rank in range(cfg.top_k):
            if top_val[rank, i] <= 0:
                break
            tops.append((name, i, rank, int(top_pos[rank, i]), float(top_val[rank, i])))
        if mx <= 0:
            continue
        valid = smp_pos[:, i] >= 0
        vals, poss = smp_val[valid, i], smp_pos[valid, i]
        bounds = np.linspace(0, mx, cfg.n_intervals + 1)
        for b in range(cfg.n_intervals):
            inside = np.flatnonzero((vals > bounds[b]) & (vals <= bounds[b + 1]))
            chosen = rng.choice(inside, size=min(cfg.per_interval, len(inside)), replace=False)
            for j in sorted(chosen, key=lambda j: -vals[j]):
                intervals.append((name, i, b, float(bounds[b]), float(bounds[b + 1]),
                                  int(poss[j]), float(vals[j])))
    return latents, tops, intervals


def build_index(lm: LoadedModel, saes: dict[str, LoadedSAE], texts: Iterable[str] | None,
                out_path: Path, cfg: IndexConfig = IndexConfig(), corpus_name: str = "",
                progress: Progress | None = None,
                token_rows: Iterable[list[int]] | None = None,
                density: dict[str, tuple[torch.Tensor, int]] | None = None) -> Path:
    """Stream ``texts`` (or ready ``token_rows`` of ``context_size`` ids, each starting with BOS)
    through ``lm`` and ``saes``; write the index atomically to ``out_path``. ``density`` maps SAE
    names to (firing counts, tokens counted) measured on more text than is indexed (a family's
    card): firing rates, dead and dense then come from those counts."""
    import duckdb
    import pandas as pd

    if not saes:
        raise ValueError("Pick at least one SAE to index.")
    progress = progress or log_progress
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(cfg.seed)
    hooks = sorted({s.hook_name for s in saes.values()})
    runs = {name: _Running(s.d_sae, cfg.top_k, cfg.n_sample) for name, s in saes.items()}
    stats = {name: ReconstructionStats(s.d_in, s.d_sae) for name, s in saes.items()}
    bos = lm.tokenizer.bos_token_id
    sequences: list[list[int]] = []
    n_tokens, start = 0, time.perf_counter()
    width = cfg.context_size
    rows_iter = iter(token_rows) if token_rows is not None else windows(lm, iter(texts), width)
    max_windows = max(1, cfg.max_tokens // (width - 1))
    while len(sequences) < max_windows:
        rows = []
        for row in rows_iter:
            rows.append(row)
            if len(rows) == min(cfg.batch_windows, max_windows - len(sequences)):
                break
        if not rows:
            break
        ids = torch.tensor(rows, device=lm.device)
        acts = run_to_hooks(lm, hooks, ids)
        keep = (ids != bos).reshape(-1)
        base = len(sequences) * width
        positions = torch.arange(base, base + ids.numel())[keep.cpu()]
        with torch.no_grad():
            for name, s in saes.items():
                x = sae_input(s, acts[s.hook_name].reshape(-1, lm.d_model)[keep])
                feats = s.sae.encode(x.to(s.sae.dtype))
                runs[name].update(feats.float().cpu(), positions, gen)
                stats[name].update(x, feats, s.sae.decode(feats))
        sequences.extend(rows)
        n_tokens += int(keep.sum())
        rate = n_tokens / (time.perf_counter() - start)
        progress(0.85 * len(sequences) / max_windows,
                 f"{n_tokens:,} tokens indexed ({rate:,.0f} tokens/s)")
    if n_tokens == 0:
        raise ValueError("The corpus gave no tokens to index; pass more text.")

    tmp = out_path.with_name(out_path.name + ".partial")
    tmp.unlink(missing_ok=True)
    con = duckdb.connect(str(tmp))
    try:
        rng = np.random.default_rng(cfg.seed)
        all_latents, all_tops, all_intervals, sae_rows = [], [], [], []
        for j, (name, s) in enumerate(saes.items()):
            progress(0.85 + 0.1 * j / len(saes), f"Weights and tables for {name}")
            weights = weight_tables(lm, s, cfg.n_logits, cfg.n_neighbours)
            st = stats[name]
            counts, counted = (density or {}).get(name, (st.fires, n_tokens))
            if counts.shape != (s.d_sae,):
                raise ValueError(f"The firing counts given for {name} have shape "
                                 f"{tuple(counts.shape)}, but the SAE has {s.d_sae} latents: pass "
                                 "the counts written with this SAE's card.")
            latents, tops, intervals = _latent_rows(name, runs[name], st.fires, (counts, counted),
                                                    cfg, weights, rng)
            all_latents += latents
            all_tops += tops
            all_intervals += intervals
            sae_rows.append({
                "sae": name, "label": s.spec.label, "d_sae": s.d_sae, "d_in": s.d_in,
                "hook": s.hook_name, "architecture": s.architecture,
                "neuronpedia_id": s.neuronpedia_id or "", "tokens": n_tokens,
                "l0": st.l0, "fve": st.fve, "density_tokens": counted,
                "dead": int(is_dead(counts).sum()), "dense": int(is_dense(counts, counted).sum()),
                "log10_density": log10_density(counts, counted),
            })
        progress(0.96, "Writing the index")
        frames = {
            "saes": pd.DataFrame(sae_rows),
            "latents": pd.DataFrame(all_latents),
            "top_examples": pd.DataFrame(all_tops, columns=["sae", "latent", "rank", "token",
                                                            "value"]),
            "interval_samples": pd.DataFrame(all_intervals, columns=[
                "sae", "latent", "interval", "lo", "hi", "token", "value"]),
            "sequences": pd.DataFrame({"seq": range(len(sequences)), "token_ids": sequences}),
        }
        for table, frame in frames.items():
            con.register("frame", frame)
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM frame")
            con.unregister("frame")
        con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
        meta = {
            "schema_version": str(SCHEMA_VERSION), "model": lm.name, "hooks": json.dumps(hooks),
            "context_size": str(width), "tokens": str(n_tokens), "corpus": corpus_name,
            "built_seconds": f"{time.perf_counter() - start:.1f}",
            "logit_lens": "decoder direction through the final norm's gain, then the unembedding",
            "config": json.dumps(cfg.__dict__),
        }
        con.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
        con.execute("CREATE INDEX latents_key ON latents (sae, latent)")
        con.execute("CREATE INDEX top_key ON top_examples (sae, latent)")
        con.execute("CREATE INDEX interval_key ON interval_samples (sae, latent)")
        con.execute("CHECKPOINT")
    finally:
        con.close()
    os.replace(tmp, out_path)
    progress(1.0, f"Index written to {out_path}")
    return out_path


def index_texts(path: Path) -> Iterable[str]:
    """Texts of a corpus file: JSONL with a ``text`` field, or plain text split at blank lines."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Corpus file {path} does not exist.")
    if path.suffix == ".jsonl":
        return [json.loads(line)["text"] for line in path.open() if line.strip()]
    return [p for p in path.read_text(errors="replace").split("\n\n") if p.strip()]


def main(argv: list[str] | None = None) -> None:
    import argparse

    from core.models import load_model, parse_model_param, tqdm_progress
    from core.saes import load_sae, parse_sae_param

    parser = argparse.ArgumentParser(description="Build a feature index (DuckDB) for SAEs.")
    parser.add_argument("--model", default="embedded", help="embedded | hub:<id> | local:<path>")
    parser.add_argument("--sae", action="append", required=True,
                        help="embedded:<name> | release:<release>/<id> | np:<id> | local:<path>;"
                        " repeat for a family")
    parser.add_argument("--corpus", type=Path, required=True, help=".jsonl or .txt file")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=500_000)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=24)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--density", type=Path, default=None,
                        help="firing_counts.safetensors from the family's card: dead, dense and "
                             "firing rates from those (larger) counts instead of the indexed tokens")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    lm = load_model(parse_model_param(args.model, device=args.device))
    saes = {}
    for value in args.sae:
        spec = parse_sae_param(value)
        if spec is None:
            raise SystemExit("--sae none indexes nothing")
        saes[spec.label] = load_sae(spec, lm)
    cfg = IndexConfig(context_size=args.context, max_tokens=args.tokens, top_k=args.top_k)
    density = None
    if args.density:
        counts, counted = load_firing_counts(args.density)
        density = {name: (counts[name], counted) for name in saes if name in counts}
    with tqdm_progress() as progress:
        build_index(lm, saes, index_texts(args.corpus), args.out, cfg,
                    corpus_name=args.corpus.name, progress=progress, density=density)


if __name__ == "__main__":
    main()
