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
What the Lookup page draws around them is stored too (``shown_spans``): the latent's activation at
every token of each example's shown span (``show_left`` tokens before it, ``show_right`` after),
as one-byte fractions of the latent's max activation, all of a latent's examples in one
zlib-compressed blob. They come from a second pass over the windows that hold examples, so a
latent's page needs no forward pass.

The streaming statistics are computed shard by shard and merged in order (``core.index_stats``),
on this machine or, with ``--ray``, on the workers of a Ray cluster (``core.index_ray``); both
give the same index.

A build holds ``<path>.lock`` (a second build of the same file is told one is running), writes to
a temporary file of its own beside ``<path>`` and moves it into place only when complete, so an
interrupted build leaves the previous index intact.

    python -m core.index --sae embedded:w512 --sae embedded:w4096 --corpus heldout.jsonl \\
        --tokens 500000 --out data/index/embedded.duckdb [--ray [ADDRESS] --workers 2]
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
import zlib
from contextlib import contextmanager
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import numpy as np
import torch

from core.density import is_dead, is_dense, load_firing_counts, log10_density
from core.hooks import run_to_hooks
from core.index_stats import IndexConfig, Running, shard_stats
from core.models import LoadedModel, Progress, log_progress
from core.saes import LoadedSAE, sae_input
from core.text import windows

if TYPE_CHECKING:
    from core.index_ray import RayConfig

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
"""2: ``shown_spans`` holds, per latent, the activations of the span shown around each example."""
READABLE_VERSIONS = (1, 2)
"""Version 1 files lack the stored spans; the page recomputes them (one forward pass)."""
ACTS_SCALE = 255
"""Stored span activations are ``round(value / max_act * ACTS_SCALE)``, one byte each: the page
colours tokens by ``value / max_act``; the example token's own value is stored exactly."""
MAX_CORPUS_LINE = 1_000_000
"""Characters per corpus line (a JSONL document); longer lines are refused."""


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


def _latent_rows(name: str, run: Running, n_tokens: int, cfg: IndexConfig,
                 weights: dict[str, np.ndarray]) -> tuple[list, list, list]:
    """Rows for the latents, top_examples and interval_samples tables. An interval's samples
    are the ones with the highest sample keys in it: a uniform choice among its tokens."""
    latents, tops, intervals = [], [], []
    fires = run.recon.fires
    count = fires.numpy()
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
            chosen = inside[:cfg.per_interval]  # the sample is in descending key order
            for j in sorted(chosen, key=lambda j: -vals[j]):
                intervals.append((name, i, b, float(bounds[b]), float(bounds[b + 1]),
                                  int(poss[j]), float(vals[j])))
    return latents, tops, intervals


class BuildRunning(RuntimeError):
    """Another build of the same index file holds its lock."""


def lock_path(out_path: Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".lock")


@contextmanager
def build_lock(out_path: Path):
    """Hold the build lock of ``out_path`` (one build per file, across threads and processes);
    raise :class:`BuildRunning` at once when another build holds it."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(lock_path(out_path)), timeout=0, thread_local=False, is_singleton=False)
    try:
        lock.acquire()
    except Timeout:
        raise BuildRunning(f"A build of {Path(out_path).name} is running; wait for it to finish "
                           "and open the index then.") from None
    try:
        yield
    finally:
        lock.release()


def build_running(out_path: Path) -> bool:
    """Whether a build of ``out_path`` holds its lock now."""
    try:
        with build_lock(out_path):
            return False
    except BuildRunning:
        return True


def build_index(lm: LoadedModel, saes: dict[str, LoadedSAE], texts: Iterable[str] | None,
                out_path: Path, cfg: IndexConfig = IndexConfig(), corpus_name: str = "",
                progress: Progress | None = None,
                token_rows: Iterable[list[int]] | None = None,
                ray: RayConfig | None = None) -> Path:
    """Stream ``texts`` (or ready ``token_rows`` of ``context_size`` ids, each starting with BOS)
    through ``lm`` and ``saes``; write the index atomically to ``out_path``. With ``ray``, the
    streaming pass runs on Ray workers (``core.index_ray``) and gives the same index.

    Raises :class:`BuildRunning` when another build of ``out_path`` is running."""
    if not saes:
        raise ValueError("Pick at least one SAE to index.")
    if ray is not None:
        from core.index_ray import import_ray

        import_ray()  # before the lock and the tokenizing: say at once when Ray is missing
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with build_lock(out_path):
        return _build(lm, saes, texts, out_path, cfg, corpus_name, progress or log_progress,
                      token_rows, ray)


def _stream(lm: LoadedModel, saes: dict[str, LoadedSAE], rows: Iterable[list[int]],
            max_windows: int, cfg: IndexConfig, progress: Progress
            ) -> tuple[dict[str, Running], list[list[int]], int]:
    """(statistics per SAE, windows read, tokens counted): the shards one after another."""
    runs = {name: Running(s.d_sae, s.d_in, cfg.top_k, cfg.n_sample) for name, s in saes.items()}
    rows = iter(rows)
    sequences: list[list[int]] = []
    n_tokens, shard, start = 0, 0, time.perf_counter()

    def report(windows_done: int, tokens: int) -> None:
        rate = tokens / (time.perf_counter() - start)
        progress(0.6 * windows_done / max_windows,
                 f"{tokens:,} tokens indexed ({rate:,.0f} tokens/s)")

    while len(sequences) < max_windows:
        batch = list(islice(rows, min(cfg.shard_windows, max_windows - len(sequences))))
        if not batch:
            break
        parts, tokens = shard_stats(
            lm, saes, batch, len(sequences), shard, cfg,
            on_batch=lambda w, t: report(len(sequences) + w, n_tokens + t))
        for name, part in parts.items():
            runs[name].merge(part)
        sequences.extend(batch)
        n_tokens += tokens
        shard += 1
    return runs, sequences, n_tokens


def _build(lm: LoadedModel, saes: dict[str, LoadedSAE], texts: Iterable[str] | None,
           out_path: Path, cfg: IndexConfig, corpus_name: str, progress: Progress,
           token_rows: Iterable[list[int]] | None, ray: RayConfig | None) -> Path:
    import duckdb
    import pandas as pd

    hooks = sorted({s.hook_name for s in saes.values()})
    start = time.perf_counter()
    width = cfg.context_size
    rows_iter = iter(token_rows) if token_rows is not None else windows(lm, iter(texts), width)
    max_windows = max(1, cfg.max_tokens // (width - 1))
    if ray is None:
        runs, sequences, n_tokens = _stream(lm, saes, rows_iter, max_windows, cfg, progress)
    else:
        from core.index_ray import ray_stream

        progress(0.0, "Cutting the corpus into windows")
        sequences = list(islice(rows_iter, max_windows))
        runs, n_tokens = ray_stream(lm, saes, sequences, cfg, ray,
                                    lambda f, m: progress(0.6 * f, m))
    if n_tokens == 0:
        raise ValueError("The corpus gave no tokens to index; pass more text.")

    all_latents, all_tops, all_intervals, sae_rows = [], [], [], []
    for j, (name, s) in enumerate(saes.items()):
        progress(0.6 + 0.1 * j / len(saes), f"Weights and tables for {name}")
        weights = weight_tables(lm, s, cfg.n_logits, cfg.n_neighbours)
        st = runs[name].recon
        latents, tops, intervals = _latent_rows(name, runs[name], n_tokens, cfg, weights)
        all_latents += latents
        all_tops += tops
        all_intervals += intervals
        sae_rows.append({
            "sae": name, "label": s.spec.label, "d_sae": s.d_sae, "d_in": s.d_in,
            "hook": s.hook_name, "architecture": s.architecture,
            "neuronpedia_id": s.neuronpedia_id or "", "tokens": n_tokens,
            "l0": st.l0, "fve": st.fve, "density_tokens": n_tokens,
            "dead": int(is_dead(st.fires).sum()),
            "dense": int(is_dense(st.fires, n_tokens).sum()),
            "log10_density": log10_density(st.fires, n_tokens),
        })
    tops = pd.DataFrame(all_tops, columns=["sae", "latent", "rank", "token", "value"])
    ivals = pd.DataFrame(all_intervals, columns=["sae", "latent", "interval", "lo", "hi",
                                                 "token", "value"])
    maxima = {name: run.maximum for name, run in runs.items()}
    (_, top_acts), (_, ival_acts) = _shown_spans(lm, saes, sequences, maxima, [tops, ivals], cfg,
                                                 lambda f, m: progress(0.7 + 0.2 * f, m))
    spans = _pack_spans(tops, top_acts, ivals, ival_acts)

    progress(0.92, "Writing the index")
    tmp = out_path.with_name(f"{out_path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        con = duckdb.connect(str(tmp))
        try:
            frames = {
                "saes": pd.DataFrame(sae_rows), "latents": pd.DataFrame(all_latents),
                "top_examples": tops, "interval_samples": ivals, "shown_spans": spans,
                "sequences": pd.DataFrame({"seq": range(len(sequences)), "token_ids": sequences}),
            }
            for table, frame in frames.items():
                con.register("frame", frame)
                con.execute(f"CREATE TABLE {table} AS SELECT * FROM frame")
                con.unregister("frame")
            con.execute("CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)")
            meta = {
                "schema_version": str(SCHEMA_VERSION), "model": lm.name,
                "hooks": json.dumps(hooks), "context_size": str(width), "tokens": str(n_tokens),
                "corpus": corpus_name, "built_seconds": f"{time.perf_counter() - start:.1f}",
                "logit_lens": "decoder direction through the final norm's gain, then the "
                              "unembedding",
                "config": json.dumps(cfg.__dict__), "acts_scale": str(ACTS_SCALE),
                "show_left": str(cfg.show_left), "show_right": str(cfg.show_right),
                "streamed_on": ("one process" if ray is None else
                                f"Ray ({ray.address}), {ray.workers} workers"),
            }
            con.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
            con.execute("CREATE INDEX latents_key ON latents (sae, latent)")
            con.execute("CREATE INDEX top_key ON top_examples (sae, latent)")
            con.execute("CREATE INDEX interval_key ON interval_samples (sae, latent)")
            con.execute("CREATE INDEX spans_key ON shown_spans (sae, latent)")
            con.execute("CHECKPOINT")
        finally:
            con.close()
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
        tmp.with_name(tmp.name + ".wal").unlink(missing_ok=True)
    progress(1.0, f"Index written to {out_path}")
    return out_path


def apply_density(path: Path, density: dict[str, tuple[torch.Tensor, int]]) -> None:
    """Firing counts measured on more text than an index holds (a family's card: 2M tokens for
    the shipped one) replace the index's own, in one transaction: each latent's firing count and
    rate, and each SAE's dead and dense counts, density histogram and ``density_tokens``. Holds
    the file's build lock, so it never runs while the index is being rebuilt."""
    with build_lock(Path(path)):
        _apply_density(Path(path), density)


def _apply_density(path: Path, density: dict[str, tuple[torch.Tensor, int]]) -> None:
    import duckdb
    import pandas as pd

    con = duckdb.connect(str(path))
    try:
        con.execute("BEGIN")
        con.execute("ALTER TABLE saes ADD COLUMN IF NOT EXISTS density_tokens BIGINT")
        con.execute("UPDATE saes SET density_tokens = tokens WHERE density_tokens IS NULL")
        for name, (counts, tokens) in density.items():
            rows = con.execute("SELECT d_sae FROM saes WHERE sae = ?", [name]).fetchall()
            row = rows[0] if rows else None
            if row is None:
                raise ValueError(f"The index {path} holds no SAE named {name!r}.")
            if counts.shape != (row[0],):
                raise ValueError(f"The firing counts given for {name} have shape "
                                 f"{tuple(counts.shape)}, but the SAE has {row[0]} latents: pass "
                                 "the counts written with this SAE's card.")
            frame = pd.DataFrame({"latent": np.arange(row[0]), "n": counts.numpy()})
            con.register("density_frame", frame)
            con.execute("""UPDATE latents SET firing_count = f.n, firing_rate = f.n / ?
                           FROM density_frame f WHERE latents.sae = ? AND latents.latent = f.latent""",
                        [float(tokens), name])
            con.unregister("density_frame")
            con.execute("UPDATE saes SET dead = ?, dense = ?, log10_density = ?, "
                        "density_tokens = ? WHERE sae = ?",
                        [int(is_dead(counts).sum()), int(is_dense(counts, tokens).sum()),
                         log10_density(counts, tokens), tokens, name])
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise
    finally:
        con.close()


@torch.no_grad()
def _shown_spans(lm: LoadedModel, saes: dict[str, LoadedSAE], sequences: list[list[int]],
                 maxima: dict[str, torch.Tensor], frames: list, cfg: IndexConfig,
                 progress: Progress) -> list[tuple[list[int], list[list[int]]]]:
    """For each frame of examples (columns ``sae``, ``latent``, ``token``): per row, the first
    shown position and the latent's quantized activation at every shown token. One forward pass
    per window that holds an example, shared by every SAE on the hook."""
    width, span = cfg.context_size, cfg.show_left + cfg.show_right + 1
    bos = lm.tokenizer.bos_token_id
    progress(0.0, "Activations around the examples")
    names = list(saes)
    # every example of every frame as arrays: frame, row, sae, latent, seq, shown [first, end)
    parts = []
    for f, frame in enumerate(frames):
        n = len(frame)
        tok = frame["token"].to_numpy(np.int64) if n else np.zeros(0, np.int64)
        parts.append(np.stack([
            np.full(n, f), np.arange(n),
            frame["sae"].map(names.index).to_numpy(np.int64) if n else np.zeros(0, np.int64),
            frame["latent"].to_numpy(np.int64) if n else np.zeros(0, np.int64),
            tok // width, np.maximum(tok % width - cfg.show_left, 0),
            np.minimum(tok % width + cfg.show_right + 1, width)], axis=1))
    req = np.concatenate(parts) if parts else np.zeros((0, 7), np.int64)
    out_start = [np.zeros(len(fr), np.int64) for fr in frames]
    out_acts: list[list] = [[None] * len(fr) for fr in frames]
    needed = np.unique(req[:, 4])
    order = np.argsort(req[:, 4], kind="stable")
    req = req[order]
    hooks = sorted({s.hook_name for s in saes.values()})
    offsets = torch.arange(span)
    for b in range(0, len(needed), cfg.batch_windows):
        seqs = needed[b:b + cfg.batch_windows]
        ids = torch.tensor([sequences[q] for q in seqs], device=lm.device)
        acts = run_to_hooks(lm, hooks, ids)
        lo, hi = np.searchsorted(req[:, 4], [seqs[0], seqs[-1] + 1])
        batch_req = req[lo:hi]
        row_of = {int(q): i for i, q in enumerate(seqs)}
        for k, (name, s) in enumerate(saes.items()):
            mine = batch_req[batch_req[:, 2] == k]
            if not len(mine):
                continue
            feats = s.sae.encode(sae_input(s, acts[s.hook_name]).to(s.sae.dtype)).float().cpu()
            feats[ids.cpu() == bos] = 0
            rows = torch.tensor([row_of[int(q)] for q in mine[:, 4]])
            starts = torch.from_numpy(mine[:, 5])
            lat = torch.from_numpy(mine[:, 3])
            pos = (starts[:, None] + offsets).clamp(max=width - 1)
            vals = feats[rows[:, None], pos, lat[:, None]]
            scale = maxima[name][lat].clamp(min=1e-12)[:, None]
            quant = (vals.clamp(min=0) / scale * ACTS_SCALE).round().clamp(max=ACTS_SCALE)
            quant = quant.to(torch.uint8).numpy()
            lengths = (mine[:, 6] - mine[:, 5]).tolist()
            for (f, r, first), length, values in zip(mine[:, [0, 1, 5]].tolist(), lengths,
                                                     quant):
                out_start[f][r] = first
                out_acts[f][r] = values[:length]
        progress(min(b + cfg.batch_windows, len(needed)) / max(len(needed), 1),
                 f"Activations around the examples ({min(b + cfg.batch_windows, len(needed)):,}"
                 f" of {len(needed):,} windows)")
    return [(list(map(int, st)), acts) for st, acts in zip(out_start, out_acts)]


def span_bounds(pos: int, show_left: int, show_right: int, width: int) -> tuple[int, int]:
    """[first, end) of the tokens shown around an example at ``pos`` of its window."""
    return max(pos - show_left, 0), min(pos + show_right + 1, width)


def _pack_spans(tops, top_acts: list, ivals, ival_acts: list):
    """One row per latent: all its examples' span activations in one zlib blob, top examples by
    rank, then interval samples by (interval, token); :func:`unpack_spans` reads them back."""
    import pandas as pd

    parts: dict[tuple[str, int], list[tuple[tuple, np.ndarray]]] = {}
    for frame, acts, key_cols in ((tops, top_acts, ["rank"]),
                                  (ivals, ival_acts, ["interval", "token"])):
        keys = zip(frame["sae"], frame["latent"], *(frame[c] for c in key_cols))
        for (sae, latent, *key), values in zip(keys, acts):
            parts.setdefault((sae, int(latent)), []).append(
                ((0 if key_cols == ["rank"] else 1, *map(int, key)), values))
    rows = []
    for (sae, latent), items in parts.items():
        items.sort(key=lambda item: item[0])
        blob = zlib.compress(np.concatenate([v for _, v in items]).astype(np.uint8).tobytes(), 9)
        rows.append((sae, latent, blob))
    return pd.DataFrame(rows, columns=["sae", "latent", "spans"])


def unpack_spans(blob: bytes, top_pos: list[int], interval_keys: list[tuple[int, int, int]],
                 show_left: int, show_right: int, width: int
                 ) -> tuple[list[np.ndarray], dict[tuple[int, int], np.ndarray]]:
    """The quantized span activations of a latent's examples: a list for the top examples (by
    rank, ``top_pos`` their positions) and a dict (interval, token) -> array for the interval
    samples (``interval_keys``: (interval, token, position))."""
    raw = np.frombuffer(zlib.decompress(blob), dtype=np.uint8)
    at = 0
    tops = []
    for pos in top_pos:
        first, end = span_bounds(pos, show_left, show_right, width)
        tops.append(raw[at:at + end - first])
        at += end - first
    ivals = {}
    for interval, token, pos in sorted(interval_keys):
        first, end = span_bounds(pos, show_left, show_right, width)
        ivals[(interval, token)] = raw[at:at + end - first]
        at += end - first
    if at != len(raw):
        raise ValueError(f"The stored spans hold {len(raw)} values but the examples need {at}; "
                         "the index is damaged. Rebuild it with `python -m core.index` (see README).")
    return tops, ivals


def corpus_texts(raw: bytes | str, kind: str, source: str = "the corpus") -> list[str]:
    """Texts of a corpus: ``jsonl`` (one JSON object with a string ``text`` per line) or ``txt``
    (split at blank lines). Every bad line is refused with its number and the fix."""
    if isinstance(raw, bytes):
        try:
            raw = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            line = raw[:exc.start].count(b"\n") + 1
            raise ValueError(f"{source} line {line} is not UTF-8 text; save the file as UTF-8."
                             ) from None
    if kind == "txt":
        return [p for p in raw.split("\n\n") if p.strip()]
    if kind != "jsonl":
        raise ValueError(f"Corpus kind {kind!r}; use 'jsonl' or 'txt'.")
    texts = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        if len(line) > MAX_CORPUS_LINE:
            raise ValueError(f"{source} line {n} has {len(line):,} characters; the limit is "
                             f"{MAX_CORPUS_LINE:,}. Split the document over several lines.")
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source} line {n} is not JSON ({exc.msg} at column {exc.colno});"
                             ' each line must be an object like {"text": "..."}.') from None
        if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
            what = ("has no \"text\" field" if isinstance(doc, dict) and "text" not in doc
                    else "has no string \"text\"")
            raise ValueError(f"{source} line {n} {what}; each line must be an object like "
                             '{"text": "..."}.')
        texts.append(doc["text"])
    if not any(t.strip() for t in texts):
        raise ValueError(f"{source} holds no text; add lines like {{\"text\": \"...\"}}.")
    return texts


def index_texts(path: Path) -> list[str]:
    """Texts of a corpus file: JSONL with a ``text`` field, or plain text split at blank lines."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Corpus file {path} does not exist.")
    return corpus_texts(path.read_bytes(), "jsonl" if path.suffix == ".jsonl" else "txt",
                        path.name)


def stored_windows(path: Path, context_size: int) -> tuple[list[list[int]], str]:
    """(token windows, corpus name) of an existing index, read into memory (so ``--out`` may be
    the same file)."""
    import duckdb

    con = duckdb.connect(str(path), read_only=True)
    try:
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        if int(meta["context_size"]) != context_size:
            raise SystemExit(f"{path} has windows of {meta['context_size']} tokens; pass "
                             f"--context {meta['context_size']}.")
        rows = [list(r) for (r,) in con.execute(
            "SELECT token_ids FROM sequences ORDER BY seq").fetchall()]
    finally:
        con.close()
    return rows, meta.get("corpus", path.name)


def main(argv: list[str] | None = None) -> None:
    import argparse

    from core.models import load_model, parse_model_param, tqdm_progress
    from core.saes import load_sae, parse_sae_param

    parser = argparse.ArgumentParser(description="Build a feature index (DuckDB) for SAEs.")
    parser.add_argument("--model", default="embedded", help="embedded | hub:<id> | local:<path>")
    parser.add_argument("--sae", action="append", default=[],
                        help="embedded:<name> | release:<release>/<id> | np:<id> | local:<path>;"
                        " repeat for a family")
    parser.add_argument("--corpus", type=Path, help=".jsonl or .txt file")
    parser.add_argument("--windows-from", type=Path, metavar="INDEX",
                        help="instead of --corpus: reuse the token windows of an existing index "
                        "(same tokenizer), e.g. to rebuild it after retraining without the corpus")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=500_000)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=24)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto",
                        help="model dtype (auto: bfloat16 on CUDA; float32 matches a CPU build)")
    parser.add_argument("--ray", nargs="?", const="local", metavar="ADDRESS",
                        help="stream on Ray workers (needs `pip install 'ray[data]'`): 'local' "
                        "(the default: start Ray on this machine), 'auto' (the cluster this "
                        "machine is a node of) or ray://<head>:10001")
    parser.add_argument("--workers", type=int, default=2,
                        help="Ray workers, each holding the model and SAEs (one GPU each where "
                        "the cluster has GPUs)")
    parser.add_argument("--cpus-per-worker", type=int, default=1)
    parser.add_argument("--shard-windows", type=int, default=64,
                        help="windows per shard (a multiple of 16)")
    parser.add_argument("--density", type=Path, default=None,
                        help="firing_counts.safetensors from the family's card: dead, dense and "
                             "firing rates from those (larger) counts instead of the indexed tokens")
    parser.add_argument("--density-only", action="store_true",
                        help="only put --density's counts into the existing index --out")
    args = parser.parse_args(argv)
    density = None
    if args.density:
        counts, counted = load_firing_counts(args.density)
        density = {name: (c, counted) for name, c in counts.items()}
    if args.density_only:
        if density is None:
            parser.error("--density-only needs --density FILE")
        apply_density(args.out, density)
        return
    if not args.sae or (args.corpus is None) == (args.windows_from is None):
        parser.error("building an index needs --sae (one or more) and one of --corpus or "
                     "--windows-from")
    logging.basicConfig(level=logging.WARNING)
    try:
        cfg = IndexConfig(context_size=args.context, max_tokens=args.tokens, top_k=args.top_k,
                          shard_windows=args.shard_windows)
        ray = None
        if args.ray:
            from core.index_ray import RayConfig, import_ray

            ray = RayConfig(address=args.ray, workers=args.workers,
                            cpus_per_worker=args.cpus_per_worker)
            import_ray()
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    lm = load_model(parse_model_param(args.model, device=args.device, dtype=args.dtype))
    saes = {}
    for value in args.sae:
        spec = parse_sae_param(value)
        if spec is None:
            raise SystemExit("--sae none indexes nothing")
        saes[spec.label] = load_sae(spec, lm)
    if args.corpus is not None:
        texts, rows, corpus_name = index_texts(args.corpus), None, args.corpus.name
    else:
        texts, (rows, corpus_name) = None, stored_windows(args.windows_from, args.context)
    with tqdm_progress() as progress:
        build_index(lm, saes, texts, args.out, cfg, corpus_name=corpus_name, progress=progress,
                    token_rows=rows, ray=ray)
    if density:
        apply_density(args.out, {n: v for n, v in density.items() if n in saes})


if __name__ == "__main__":
    main()
