"""The index build's streaming statistics, in a form that merges exactly.

The windows are cut into shards of ``shard_windows`` windows. Each shard yields, per SAE, a
:class:`ShardStats`: firing counts, sums and maxima per latent, each latent's best ``top_k``
firing tokens and its ``n_sample`` firing tokens with the highest sample keys, and the
reconstruction sums. :meth:`Running.merge` adds shards to the running tables in shard order.
A build on one machine and a build whose shards ran on many workers (``core.index_ray``)
compute the same shards and merge them in the same order, so they give the same index, bit for
bit.

What makes the selection independent of where a shard ran:

* top examples are ranked by (activation descending, global token position ascending), a total
  order, so ties are broken the same way everywhere;
* the uniform sample of firing tokens keeps, per latent, the tokens with the highest key, where
  the key is a seeded hash of (global token position, latent): no random generator whose state
  would depend on the order shards ran in. The best-keyed sample of a union is the best-keyed
  sample of the parts' best-keyed samples, so partial samples merge exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from core.hooks import run_to_hooks
from core.models import LoadedModel
from core.saes import LoadedSAE, ReconstructionStats, sae_input


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
    """Seeds the hash that orders firing tokens for the uniform sample."""
    show_left: int = 24
    """Tokens shown before an example's token on the Lookup page (their activations are stored)."""
    show_right: int = 6
    """Tokens shown after it."""
    shard_windows: int = 64
    """Windows per shard: the unit of work a worker takes and whose statistics are merged in
    order. A multiple of ``batch_windows``, so every forward pass sees the same batch on one
    machine and on a cluster."""

    def __post_init__(self) -> None:
        if self.context_size < 4 or self.max_tokens < self.context_size:
            raise ValueError(f"context_size={self.context_size} and max_tokens="
                             f"{self.max_tokens} leave nothing to index.")
        if min(self.top_k, self.n_sample, self.n_intervals, self.per_interval) < 1:
            raise ValueError("top_k, n_sample, n_intervals and per_interval must be >= 1.")
        if min(self.show_left, self.show_right) < 0:
            raise ValueError(f"show_left={self.show_left} and show_right={self.show_right} "
                             "must be >= 0.")
        if self.batch_windows < 1 or self.shard_windows % self.batch_windows:
            raise ValueError(f"shard_windows={self.shard_windows} must be a multiple of "
                             f"batch_windows={self.batch_windows} (and batch_windows >= 1); "
                             f"try shard_windows={4 * max(self.batch_windows, 1)}.")


_MIX = (0x9E3779B97F4A7C15, 0xD1B54A32D192ED03, 0x8CB92BA72F3D8DD7)


def sample_keys(positions: torch.Tensor, latents: torch.Tensor, seed: int) -> torch.Tensor:
    """A seeded 32-bit hash of (global token position, latent) per firing entry (splitmix64's
    finalizer, top bits): the order in which firing tokens enter a latent's uniform sample.
    Equal keys are broken by token position, like equal activations."""
    with np.errstate(over="ignore"):
        z = (positions.numpy().astype(np.uint64) * np.uint64(_MIX[0])
             + latents.numpy().astype(np.uint64) * np.uint64(_MIX[1])
             + np.uint64(seed % 2**64) * np.uint64(_MIX[2]))
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return torch.from_numpy((z >> np.uint64(32)).astype(np.int64))


def _ranked(lat: torch.Tensor, descending: torch.Tensor, cap: int) -> torch.Tensor:
    """Indices of each latent's ``cap`` best entries, latent-major and best first, where best
    is the highest ``descending`` (a non-negative int below 2**32); entries come in ascending
    token position and a stable sort keeps that order among equals. One sort of one int64 key."""
    order = torch.argsort((lat << 32) | (0xFFFFFFFF - descending), stable=True)
    _, counts = torch.unique_consecutive(lat[order], return_counts=True)
    rank = torch.arange(len(order)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts,
                                                               counts)
    return order[rank < cap]


def _table(lat: torch.Tensor, columns: list[torch.Tensor], fills: list[float]
           ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(latents, ``[latents, width]`` tables) of flat, latent-major, best-first entries."""
    touched, counts = torch.unique_consecutive(lat, return_counts=True)
    row = torch.repeat_interleave(torch.arange(len(touched)), counts)
    rank = torch.arange(len(lat)) - torch.repeat_interleave(torch.cumsum(counts, 0) - counts,
                                                             counts)
    width = int(counts.max())
    tables = []
    for column, fill in zip(columns, fills):
        t = torch.full((len(touched), width), fill, dtype=column.dtype)
        t[row, rank] = column
        tables.append(t)
    return touched, tables


def _merge_sorted(old: list[torch.Tensor], new: list[torch.Tensor], cap: int, empty: float
                  ) -> list[torch.Tensor]:
    """Per row, the ``cap`` best of two tables, each sorted best first (score descending, then
    token position ascending; empty slots last, with the lowest score and position -1).
    ``old[0]``/``new[0]`` are the scores, ``[1]`` the positions, the rest payloads. Every old
    entry comes from an earlier token than every new one (shards merge in order), so on equal
    scores the old entry wins. Each entry's merged rank is its own rank plus the number of the
    other table's entries ahead of it (a row-wise binary search): no sort of the whole rows."""
    old_score, new_score = -old[0].contiguous(), -new[0].contiguous()  # ascending
    before_new = torch.searchsorted(old_score, new_score, right=True)  # old ahead of each new
    before_old = torch.searchsorted(new_score, old_score, right=False)  # new ahead of each old
    rank_old = torch.arange(old_score.shape[1]) + before_old
    rank_new = torch.arange(new_score.shape[1]) + before_new
    rows = torch.arange(old_score.shape[0])[:, None]
    fills = [empty, -1] + [0] * (len(old) - 2)
    out = [torch.full((old_score.shape[0], cap), f, dtype=t.dtype) for t, f in zip(old, fills)]
    for table, rank in ((old, rank_old), (new, rank_new)):
        keep = (table[1] >= 0) & (rank < cap)
        r, at = rows.expand_as(rank)[keep], rank[keep]
        for o, t in zip(out, table):
            o[r, at] = t[keep]
    return out


@dataclass
class ShardStats:
    """What one shard of windows yields for one SAE. Examples are flat, latent-major lists:
    each latent's best ``top_k`` by activation, and its ``n_sample`` best by sample key."""

    shard: int
    total: torch.Tensor
    """[d_sae] sums of activations (float64)."""
    maximum: torch.Tensor
    """[d_sae] maxima (0 where the latent never fired)."""
    top: tuple[torch.Tensor, torch.Tensor, torch.Tensor]
    """(latent, activation, global token position)."""
    sample: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
    """(latent, key, activation, global token position)."""
    recon: ReconstructionStats
    """Firing counts per latent, L0 and FVE sums."""


class _ShardAccumulator:
    """The firing entries of one SAE over one shard, collected batch by batch."""

    def __init__(self, s: LoadedSAE) -> None:
        self.d_sae = s.d_sae
        self.lat: list[torch.Tensor] = []
        self.val: list[torch.Tensor] = []
        self.pos: list[torch.Tensor] = []
        self.recon = ReconstructionStats(s.d_in, s.d_sae)

    def add(self, feats: torch.Tensor, positions: torch.Tensor) -> None:
        """``feats`` [n, d_sae] on any device, ``positions`` [n] global token ids (ascending)."""
        tok, lat = (feats > 0).nonzero(as_tuple=True)  # row-major: ascending token position
        self.val.append(feats[tok, lat].float().cpu())
        self.lat.append(lat.cpu())
        self.pos.append(positions[tok.cpu()])

    def finish(self, shard: int, cfg: IndexConfig) -> ShardStats:
        lat, val, pos = (torch.cat(x) if x else torch.zeros(0, dtype=torch.long)
                         for x in (self.lat, self.val, self.pos))
        val = val.float()
        d = self.d_sae
        total = torch.zeros(d, dtype=torch.float64).index_add_(0, lat, val.double())
        maximum = torch.zeros(d).scatter_reduce_(0, lat, val, "amax")
        # a positive float32's bits order like its value
        top = _ranked(lat, val.view(torch.int32).long(), cfg.top_k)
        keys = sample_keys(pos, lat, cfg.seed)
        smp = _ranked(lat, keys, cfg.n_sample)
        return ShardStats(shard, total, maximum, (lat[top], val[top], pos[top]),
                          (lat[smp], keys[smp], val[smp], pos[smp]), self.recon)


@torch.no_grad()
def shard_stats(lm: LoadedModel, saes: dict[str, LoadedSAE], rows, first_window: int,
                shard: int, cfg: IndexConfig,
                on_batch: Callable[[int, int], None] | None = None
                ) -> tuple[dict[str, ShardStats], int]:
    """(statistics per SAE, tokens counted) of the windows ``rows`` (``[n, context_size]`` ids),
    the first of which is window number ``first_window`` of the build. ``on_batch`` is told
    (windows, tokens) done in the shard after each forward pass."""
    rows = torch.as_tensor(np.asarray(rows), dtype=torch.long)
    hooks = sorted({s.hook_name for s in saes.values()})
    accs = {name: _ShardAccumulator(s) for name, s in saes.items()}
    bos = lm.tokenizer.bos_token_id
    width, tokens = cfg.context_size, 0
    for b in range(0, len(rows), cfg.batch_windows):
        ids = rows[b:b + cfg.batch_windows]
        acts = run_to_hooks(lm, hooks, ids.to(lm.device))
        keep = (ids != bos).reshape(-1)
        base = (first_window + b) * width
        positions = torch.arange(base, base + ids.numel())[keep]
        keep = keep.to(lm.device)
        for name, s in saes.items():
            x = sae_input(s, acts[s.hook_name].reshape(-1, lm.d_model)[keep])
            feats = s.sae.encode(x.to(s.sae.dtype))
            accs[name].add(feats, positions)
            accs[name].recon.update(x, feats, s.sae.decode(feats))
        tokens += int(keep.sum())
        if on_batch is not None:
            on_batch(b + len(ids), tokens)
    return {name: acc.finish(shard, cfg) for name, acc in accs.items()}, tokens


@dataclass
class Running:
    """The build's statistics for one SAE, shard by shard (in shard order)."""

    d_sae: int
    d_in: int
    k: int
    n_sample: int
    shards: int = 0
    total: torch.Tensor = field(init=False)
    maximum: torch.Tensor = field(init=False)
    top_val: torch.Tensor = field(init=False)
    top_pos: torch.Tensor = field(init=False)
    smp_key: torch.Tensor = field(init=False)
    smp_val: torch.Tensor = field(init=False)
    smp_pos: torch.Tensor = field(init=False)
    recon: ReconstructionStats = field(init=False)
    """Firing counts per latent, L0 and FVE."""

    def __post_init__(self) -> None:
        d = self.d_sae  # per-latent rows: [d_sae, k] so selection runs along contiguous memory
        self.total = torch.zeros(d, dtype=torch.float64)
        self.maximum = torch.zeros(d)
        self.top_val = torch.zeros(d, self.k)
        self.top_pos = torch.full((d, self.k), -1, dtype=torch.long)
        self.smp_key = torch.full((d, self.n_sample), -1, dtype=torch.long)
        self.smp_val = torch.zeros(d, self.n_sample)
        self.smp_pos = torch.full((d, self.n_sample), -1, dtype=torch.long)
        self.recon = ReconstructionStats(self.d_in, self.d_sae)

    def merge(self, part: ShardStats) -> None:
        """Add the next shard (shards must come in order: sums are not associative)."""
        if part.shard != self.shards:
            raise ValueError(f"Shard {part.shard} arrived where shard {self.shards} was due; "
                             "merge shards in order.")
        self.shards += 1
        self.total += part.total
        self.maximum = torch.maximum(self.maximum, part.maximum)
        self.recon.merge(part.recon)
        self._merge_part(part.top[0], part.top[1], [part.top[2]], ("top_val", "top_pos"),
                         self.k, 0.0)
        lat, key, val, pos = part.sample
        self._merge_part(lat, key, [pos, val], ("smp_key", "smp_pos", "smp_val"),
                         self.n_sample, -1)

    def _merge_part(self, lat: torch.Tensor, score: torch.Tensor, payloads: list[torch.Tensor],
                    names: tuple[str, ...], cap: int, empty: float) -> None:
        """Merge a shard's flat, latent-major entries into the tables ``names`` (score,
        position, payloads), touching only the rows where an entry gets in."""
        if not len(lat):
            return
        touched, new = _table(lat, [score, *payloads], [empty, -1] + [0] * (len(payloads) - 1))
        tables = [getattr(self, n) for n in names]
        gets_in = new[0][:, 0] > tables[0][touched, -1]  # full rows keep ties: old tokens win
        touched, new = touched[gets_in], [t[gets_in] for t in new]
        merged = _merge_sorted([t[touched] for t in tables], new, cap, empty)
        for table, values in zip(tables, merged):
            table[touched] = values
