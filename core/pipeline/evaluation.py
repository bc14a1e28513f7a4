"""Evaluate SAEs on held-out text with sae_lens's metric definitions.

* FVE (fraction of variance explained): ``1 - Σ‖x - x̂‖² / Σ‖x - x̄‖²`` over all tokens;
* L0: mean number of latents > 0 per token;
* density: each latent's firing count over the density sample (held-out text, plus the corpus's
  ``unseen`` split when there is one: at least 2M tokens for the shipped family); dead: latents
  that never fire on it (:func:`core.density.is_dead`); dense: latents firing on more than 1
  token in 10. Every figure is quoted with the number of tokens it was counted on;
* CE loss: next-token cross-entropy clean, with the SAE reconstruction spliced in at the hook, and
  with the hook zero-ablated; CE loss recovered = (zero − spliced) / (zero − clean);
* density: log10 firing rate of every latent (dead latents at −10).

BOS positions are left out of every statistic and kept clean when splicing (the SAEs are not
trained on them; see ``core.pipeline.training``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator

import torch

from core.density import is_dead, is_dense
from core.hooks import forward, hooked, run_to_hooks
from core.models import LoadedModel
from core.saes import LoadedSAE, ReconstructionStats, sae_input
from core.text import windows

@dataclass
class SaeMetrics:
    """One SAE on one held-out split."""

    name: str
    d_sae: int
    tokens: int
    fve: float
    l0: float
    dead_fraction: float
    dense_fraction: float
    ce_clean: float
    ce_spliced: float
    ce_zero: float
    ce_recovered: float
    ce_tokens: int
    log10_density: list[float]
    fires: list[int] = field(default_factory=list)
    """Firing count of every latent over ``tokens`` tokens."""

    @property
    def ce_increase(self) -> float:
        return self.ce_spliced - self.ce_clean

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k not in ("log10_density", "fires")}
        out["ce_increase"] = self.ce_increase
        return out


def heldout_windows(lm: LoadedModel, paths: Path | list[Path], context_size: int,
                    max_tokens: int) -> torch.Tensor:
    """``[n, context_size]`` ids from JSONL files read in order, each window starting with BOS."""
    paths = [paths] if isinstance(paths, Path) else list(paths)
    texts = (json.loads(line)["text"] for path in paths for line in path.open())
    path = " + ".join(str(p) for p in paths)
    rows = []
    for row in windows(lm, texts, context_size):
        rows.append(row)
        if len(rows) * (context_size - 1) >= max_tokens:
            break
    if not rows:
        raise ValueError(f"{path} holds fewer than {context_size} tokens; build a larger split.")
    return torch.tensor(rows)


def _batches(ids: torch.Tensor, batch: int) -> Iterator[torch.Tensor]:
    for start in range(0, ids.shape[0], batch):
        yield ids[start:start + batch]


@torch.no_grad()
def reconstruction_stats(lm: LoadedModel, saes: dict[str, LoadedSAE], ids: torch.Tensor,
                         batch: int = 16) -> dict[str, dict]:
    """FVE, L0 and firing counts for every SAE from one pass over ``ids`` (same hook)."""
    hook = next(iter(saes.values())).hook_name
    bos = lm.tokenizer.bos_token_id
    acc = {name: ReconstructionStats(s.d_in, s.d_sae) for name, s in saes.items()}
    for chunk in _batches(ids, batch):
        chunk = chunk.to(lm.device)
        x = run_to_hooks(lm, [hook], chunk)[hook][chunk != bos]
        for name, s in saes.items():
            xin = sae_input(s, x)
            feats = s.sae.encode(xin.to(s.sae.dtype))
            acc[name].update(xin, feats, s.sae.decode(feats))
    return {
        name: {
            "tokens": a.n, "fve": a.fve, "l0": a.l0,
            "dead_fraction": is_dead(a.fires).double().mean().item(),
            "dense_fraction": is_dense(a.fires, a.n).double().mean().item(),
            "log10_density": a.log10_density(), "fires": a.fires.tolist(),
        }
        for name, a in acc.items()
    }


@torch.no_grad()
def ce_losses(lm: LoadedModel, saes: dict[str, LoadedSAE], ids: torch.Tensor,
              batch: int = 8) -> dict[str, float]:
    """Mean next-token CE: ``clean``, ``zero`` (hook ablated) and one entry per SAE spliced in."""
    hook = next(iter(saes.values())).hook_name
    bos = lm.tokenizer.bos_token_id

    def mean_ce(edit=None) -> float:
        total, count = 0.0, 0
        for chunk in _batches(ids, batch):
            chunk = chunk.to(lm.device)
            keep = (chunk != bos).unsqueeze(-1)

            def fn(act, keep=keep):
                return torch.where(keep, edit(act), act)

            if edit is None:
                logits = forward(lm, chunk).logits
            else:
                with hooked(lm, {hook: fn}):
                    logits = forward(lm, chunk).logits
            logp = logits[:, :-1].float().log_softmax(-1)
            target = chunk[:, 1:]
            nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
            mask = target != bos
            total += nll[mask].sum().item()
            count += mask.sum().item()
        return total / count

    def splice(s: LoadedSAE):
        def edit(act):
            xin = sae_input(s, act)
            recon = s.sae.decode(s.sae.encode(xin.to(s.sae.dtype))).to(act.dtype)
            return recon + (act - xin)  # undo the centring, if any, around the reconstruction

        return edit

    out = {"clean": mean_ce(), "zero": mean_ce(lambda act: torch.zeros_like(act))}
    for name, s in saes.items():
        out[name] = mean_ce(splice(s))
    return out


def evaluate_family(lm: LoadedModel, saes: dict[str, LoadedSAE], heldout: Path | list[Path],
                    context_size: int = 128, max_tokens: int = 200_000,
                    ce_tokens: int = 32_768) -> list[SaeMetrics]:
    """FVE, L0 and density on up to ``max_tokens`` tokens of ``heldout`` (one JSONL or several,
    read in order); CE on the first ``ce_tokens`` of them."""
    ids = heldout_windows(lm, heldout, context_size, max_tokens)
    gpu = lm.device.type == "cuda"
    stats = reconstruction_stats(lm, saes, ids, batch=256 if gpu else 16)
    ce_ids = ids[: max(1, ce_tokens // (context_size - 1))]
    ce = ce_losses(lm, saes, ce_ids, batch=64 if gpu else 8)
    results = []
    for name, s in saes.items():
        st = stats[name]
        recovered = (ce["zero"] - ce[name]) / (ce["zero"] - ce["clean"])
        results.append(SaeMetrics(
            name=name, d_sae=s.d_sae, tokens=st["tokens"], fve=st["fve"], l0=st["l0"],
            dead_fraction=st["dead_fraction"], dense_fraction=st["dense_fraction"],
            ce_clean=ce["clean"], ce_spliced=ce[name], ce_zero=ce["zero"],
            ce_recovered=recovered, ce_tokens=int(ce_ids.numel() - ce_ids.shape[0]),
            log10_density=st["log10_density"], fires=st["fires"],
        ))
    return results


def heldout_splits(corpus_dir: Path) -> list[Path]:
    """The corpus's splits never trained on, in reading order: held-out, then unseen if built."""
    paths = [Path(corpus_dir) / name for name in ("heldout.jsonl", "unseen.jsonl")]
    if not paths[0].exists():
        raise FileNotFoundError(f"{paths[0]} is missing: build the corpus first "
                                "(python -m core.pipeline.corpus --out DIR --unseen-tokens 3000000).")
    return [p for p in paths if p.exists()]
