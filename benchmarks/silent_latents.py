"""Why do so many w4096 latents stay silent on held-out text? The card's silent latents (never
fired on its 1,998,927 held-out + unseen tokens, ``data/saes/firing_counts.safetensors``) and rare
ones (fired 1-5 times there), run again on text of three kinds, equal token counts each:

* ``samples``: text the model writes itself, made as the ``samples`` corpus source makes it
  (``core.pipeline.corpus.model_samples``: the same openings, temperature 1, top-p 0.95, 192 new
  tokens) with another seed, so the SAEs never saw it (the family trained on 980k such tokens);
* ``heldout``: the first windows of the shipped index (``data/index/embedded.duckdb``), the
  corpus's held-out split cut as the card cut it: this text is inside the card's count, so any
  silent latent firing here measures this machine's arithmetic (float32 CPU) against the card's
  (bf16 H200), not the text;
* ``python-source``: pieces of this interpreter's standard library, one source of the main corpus
  (text of the corpus's kind; most pieces are in none of its splits, some in train or unseen).

Per side, with the card's windowing (128 tokens, one BOS per window, documents joined by BOS, BOS
positions left out): how many silent / rare latents fire at least once as saved (JumpReLU, global
threshold), and as trained (BatchTopK, k = 64 over shuffled batches of 8,192 tokens); their
largest pre-activation against the threshold; firings at BOS positions (which the card and
training leave out), on special tokens other than BOS (``<start_of_image>`` and the like, which
text spells out and the tokenizer turns into the token) and on massive-activation tokens (other
non-BOS tokens whose residual norm is an outlier like BOS's, :data:`MASSIVE`); "ordinary" tokens
are the rest. With 1,024-token windows over the same streams: firings past position 127 (beyond
the context trained and evaluated on), on ordinary tokens and in all. For ``samples``: which
silent latents fire most, on which tokens and openings.

Then every held-out window of the index (149,898 tokens, all inside the card's count) as saved
and as trained: JumpReLU firings, and BatchTopK over shuffled batches alone and with samples
mixed in at their share of the training text, with each batch's cutoff against the saved
threshold. With ``--train-corpus`` (a rebuild of the shipped corpus, checked against its
manifest), the same figures on as many windows of the training text, picked as the training
stream picked them (:func:`trained_rows`): windows the SAEs were trained on. And from the card's
counts alone: latents fired exactly k times, and the Good-Toulmin estimate of how many more would
fire on another 2M tokens of the same text.

    python benchmarks/silent_latents.py --threads 1 [--tokens 24000] [--seed 1] \
        [--samples-dir ~/.cache/sae-workbench/samples-seed1] [--train-corpus CORPUS] \
        [--no-sides] [--no-long]

Samples are kept in ``<samples-dir>/samples-seed<seed>.jsonl`` (the corpus builder's cache file:
``python -m core.pipeline.corpus --out DIR --sources samples --seed 1 --sample-batch 32
--sample-tokens 24000 --train-tokens 1000 --heldout-tokens 1000`` writes the same file) and
reused; on the 2-core CPU the model writes about 20 tokens/s. Writes its JSON to results/.
"""

from __future__ import annotations

import collections
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from record import arguments, parse, save  # noqa: E402
from core.density import load_firing_counts  # noqa: E402
from core.hooks import run_to_hooks  # noqa: E402
from core.models import ModelSpec, load_model  # noqa: E402
from core.pipeline.corpus import (  # noqa: E402
    OPENINGS,
    CorpusConfig,
    cached_samples,
    python_source,
    split_long,
)
from core.saes import EMBEDDED_SAE_DIR, SaeSpec, load_sae, sae_input  # noqa: E402
from core.text import tracked_windows, windows  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CONTEXT, LONG_CONTEXT, BATCH_TOKENS, EARLY = 128, 1024, 8192, 16
RARE_MAX = 5
MASSIVE = 3.0
"""A non-BOS token whose residual norm at the hook is above this many times the median of its
batch counts as a massive-activation token (BOS-like outliers, about 7x the median here)."""


# --- pure helpers -----------------------------------------------------------------------------


def card_sets(fires: torch.Tensor, rare_max: int = RARE_MAX) -> dict[str, torch.Tensor]:
    """Latent ids the card counted silent (0 firings) and rare (1..``rare_max``)."""
    return {"silent": torch.nonzero(fires == 0).flatten(),
            "rare": torch.nonzero((fires >= 1) & (fires <= rare_max)).flatten()}


def fired_among(counts: torch.Tensor, latents: torch.Tensor) -> int:
    """How many of ``latents`` have a positive count."""
    return int((counts[latents] > 0).sum())


def good_toulmin(fires: torch.Tensor, t: float = 1.0, terms: int = 20) -> float:
    """Good-Toulmin estimate of how many latents silent on the counted tokens would fire at least
    once on ``t`` times as many more tokens of the same text (reliable for ``t`` <= 1):
    ``sum_k (-1)^(k+1) t^k n_k`` over latents fired exactly ``k`` times."""
    return float(sum((-1) ** (k + 1) * t ** k * int((fires == k).sum())
                     for k in range(1, terms + 1)))


def batch_topk_counts(pre: torch.Tensor, k: float) -> torch.Tensor:
    """Per-latent selections of sae_lens's BatchTopK on one batch of pre-activations
    ``[tokens, d_sae]``: the ``k * tokens`` largest positive values of the whole batch."""
    acts = pre.relu().flatten()
    top = torch.topk(acts, int(k * pre.shape[0])).indices
    top = top[acts[top] > 0]
    return torch.bincount(top % pre.shape[1], minlength=pre.shape[1])


def massive_tokens(x: torch.Tensor, body: torch.Tensor, factor: float = MASSIVE) -> torch.Tensor:
    """``[n, L]`` bool: non-BOS (``body``) positions whose activation norm exceeds ``factor``
    times the median norm of the batch's non-BOS positions."""
    norm = x.norm(dim=-1)
    return body & (norm > factor * norm[body].median())


def special_ids(tokenizer) -> torch.Tensor:
    """Ids of the tokenizer's special tokens other than BOS (``<start_of_image>``, ``<eos>``,
    ...): text that spells one out is tokenized to it. Narrower than
    ``core.dreaming.banned_tokens`` on purpose: that also bans Gemma's added HTML tokens
    (``<table>``, ``<td>``, ...), which real text holds and which count here like any token."""
    control = re.compile(r"^(<(start|end)_of_\w+>|\[multimodal\])$")
    ids = {i for i, t in tokenizer.added_tokens_decoder.items()
           if t.special or control.match(t.content)}
    return torch.tensor(sorted(ids - {tokenizer.bos_token_id}))


def opening_of(text: str) -> str:
    matches = [o for o in OPENINGS if text.startswith(o)]
    return max(matches, key=len) if matches else ""


# --- activations ------------------------------------------------------------------------------


@torch.no_grad()
def pre_acts(s, x: torch.Tensor) -> torch.Tensor:
    """JumpReLU pre-activations ``[n, d_sae]`` in float32 for SAE inputs ``x``."""
    sae = s.sae
    xin = sae_input(s, x).to(sae.dtype)
    hidden = sae.process_sae_in(xin) @ sae.W_enc + sae.b_enc
    return hidden.float()


@torch.no_grad()
def run_side(lm, s, rows: torch.Tensor, keep: torch.Tensor, threshold: torch.Tensor,
             batch: int = 16) -> dict:
    """One pass over ``rows``: per-latent firing counts and max pre-activation on non-BOS
    positions, and on the special and massive-activation tokens among them; firings at BOS
    positions; firings of ``keep`` latents by position; the SAE inputs of every non-BOS token
    (for BatchTopK)."""
    special = special_ids(lm.tokenizer)
    special_counts = torch.zeros(s.d_sae, dtype=torch.long)
    n_special = 0
    bos = lm.tokenizer.bos_token_id
    d = s.d_sae
    counts = torch.zeros(d, dtype=torch.long)
    massive_counts = torch.zeros(d, dtype=torch.long)
    n_massive = 0
    bos_counts = torch.zeros(d, dtype=torch.long)
    max_pre = torch.full((d,), -float("inf"))
    by_pos = torch.zeros(rows.shape[1], len(keep), dtype=torch.long)
    xs, where = [], []
    checked = False
    for start in range(0, rows.shape[0], batch):
        chunk = rows[start:start + batch]
        x = run_to_hooks(lm, [s.hook_name], chunk)[s.hook_name].float()
        pre = pre_acts(s, x)
        fire = pre > threshold
        if not checked:  # the saved SAE's own encode agrees with threshold on pre-activations
            enc = s.sae.encode(sae_input(s, x).to(s.sae.dtype)) > 0
            agree = (enc == fire).float().mean().item()
            if agree < 0.9999:
                raise AssertionError(f"encode and pre > threshold agree on only {agree:.5f}")
            checked = True
        is_bos = chunk == bos
        counts += fire[~is_bos].sum(0)
        is_special = torch.isin(chunk, special)
        special_counts += fire[is_special].sum(0)
        n_special += int(is_special.sum())
        massive = massive_tokens(x, ~is_bos) & ~is_special
        massive_counts += fire[massive].sum(0)
        n_massive += int(massive.sum())
        bos_counts += fire[is_bos].sum(0)
        max_pre = torch.maximum(max_pre, pre[~is_bos].amax(0))
        by_pos += (fire[..., keep] & ~is_bos.unsqueeze(-1)).sum(0)
        xs.append(x[~is_bos])
        b, p = torch.nonzero(~is_bos, as_tuple=True)
        where.append(torch.stack([b + start, p], 1))
    return {"counts": counts, "massive_counts": massive_counts, "massive_tokens": n_massive,
            "special_counts": special_counts, "special_tokens": n_special,
            "bos_counts": bos_counts, "max_pre": max_pre, "by_pos": by_pos,
            "x": torch.cat(xs), "where": torch.cat(where),
            "tokens": int((rows != bos).sum()), "bos_positions": int((rows == bos).sum())}


@torch.no_grad()
def batch_topk_side(s, x: torch.Tensor, k: float, seed: int, cutoffs: list | None = None
                    ) -> torch.Tensor:
    """Per-latent BatchTopK selections over ``x`` shuffled into batches of 8,192 tokens (a last
    shorter batch included), as in training; each batch's cutoff (its smallest selected value,
    what sae_lens's threshold averages) is appended to ``cutoffs``."""
    order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    counts = torch.zeros(s.d_sae, dtype=torch.long)
    for start in range(0, len(order), BATCH_TOKENS):
        pre = pre_acts(s, x[order[start:start + BATCH_TOKENS]])
        counts += batch_topk_counts(pre, k)
        if cutoffs is not None:
            cutoffs.append(round(torch.topk(pre.relu().flatten(),
                                            int(k * pre.shape[0])).values[-1].item(), 1))
    return counts


def long_windows(lm, streams: list[int], n_tokens: int) -> torch.Tensor:
    """``[n, LONG_CONTEXT]`` windows (BOS, then a stretch of the side's token stream)."""
    bos = lm.tokenizer.bos_token_id
    body = LONG_CONTEXT - 1
    n = max(1, min(len(streams) // body, -(-n_tokens // body)))
    rows = torch.tensor(streams[: n * body], dtype=torch.long).reshape(n, body)
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), rows], 1)


def stream_of(rows: torch.Tensor) -> list[int]:
    """The token stream 128-token windows were cut from (window-start BOS removed; a separator
    that fell on a window start is lost)."""
    return rows[:, 1:].flatten().tolist()


# --- sides ------------------------------------------------------------------------------------


def heldout_rows(index_path: Path) -> torch.Tensor:
    import duckdb

    con = duckdb.connect(str(index_path), read_only=True)
    meta = dict(con.execute("select key, value from meta").fetchall())
    seqs = [r[0] for r in con.execute("select token_ids from sequences order by seq").fetchall()]
    con.close()
    if meta.get("corpus") != "heldout.jsonl" or int(meta.get("context_size", 0)) != CONTEXT:
        raise ValueError(f"{index_path} was not built on held-out windows of {CONTEXT}: {meta}")
    return torch.tensor(seqs, dtype=torch.long)


def python_rows(lm, n_windows: int, seed: int) -> tuple[torch.Tensor, dict]:
    pieces = [p for doc in python_source() for p in split_long(doc, 8_000)]
    pieces.sort(key=lambda d: d.doc_id)
    random.Random(seed).shuffle(pieces)
    rows = []
    for ids, _ in tracked_windows(lm, (p.text for p in pieces), CONTEXT):
        rows.append(ids)
        if len(rows) >= n_windows:
            break
    return torch.tensor(rows), {"pieces_in_stdlib": len(pieces),
                                "pieces_in_shipped_corpus": {"train": 604, "heldout": 6,
                                                             "unseen": 85}}


def trained_rows(corpus: Path, n_windows: int, bos: int, root: Path = EMBEDDED_SAE_DIR
                 ) -> tuple[torch.Tensor, np.ndarray, dict]:
    """The first ``n_windows`` windows of the main corpus that the family's training stream took
    (``core.pipeline.training.activation_batches``: the corpus's train split, one BOS, the samples
    corpus's train split, cut into windows of ``CONTEXT`` taken in a seeded random order), read
    from ``corpus``, a rebuild of the shipped corpus (checked against the manifest's sha256).
    Windows of the samples corpus are skipped: its text is not reproducible byte for byte.
    Returns the windows, their numbers in the stream, and what was taken."""
    import hashlib

    from core.pipeline.corpus import stream_windows, token_stream

    cfg = json.loads((root / "w4096" / "cfg.json").read_text())["metadata"]["training_config"]
    want = json.loads((root / "corpus-manifest.json").read_text())["sha256"]["train"]
    got = hashlib.sha256((corpus / "train.jsonl").read_bytes()).hexdigest()
    if got != want:
        raise ValueError(f"{corpus}/train.jsonl is not the shipped corpus's train split "
                         f"(sha256 {got[:12]}, manifest {want[:12]}): rebuild it with the "
                         "command in data/saes/PROVENANCE.md.")
    ids = token_stream(corpus / "train.jsonl")
    samples = json.loads((root / "samples-manifest.json").read_text())["splits"]["train"]
    samples_len = sum(v["tokens"] + v["documents"] for v in samples.values()) - 1  # + separators
    body = cfg["context_size"] - 1
    n_all = (len(ids) + 1 + samples_len) // body
    main_windows = len(ids) // body
    order = np.random.default_rng(cfg["seed"]).permutation(n_all)
    trained_windows = cfg["training_tokens"] // body  # about: BOS separators are not trained on
    # the norm estimate's batches come first and the shuffle pool holds tokens back: skip the
    # windows of the first harvests, which may have gone to the estimate and not to training
    skip = (cfg["norm_batches"] * cfg["batch_tokens"] + 2 * cfg["shuffle_tokens"]) // body + 1
    skip = -(-skip // cfg["windows_per_forward"]) * cfg["windows_per_forward"]  # whole harvests
    first = [int(w) for w in order[skip:trained_windows] if w < main_windows][:n_windows]
    taken = np.sort(first)
    meta = {"corpus_train_tokens": len(ids), "windows_in_stream": n_all,
            "windows_of_main_corpus": main_windows, "windows_trained_on_about": trained_windows,
            "first_stream_windows_skipped": skip, "windows_taken": len(first),
            "last_taken_at_stream_position":
                int(np.flatnonzero(np.isin(order, first)).max()) if first else None}
    return stream_windows(ids, bos, cfg["context_size"], which=taken), taken, meta


def source_lookup(corpus: Path, split: str, windows: np.ndarray, context: int, bos: int):
    """``where`` (``[n, 2]``: row, position in the window, as :func:`run_side` gives) -> the
    corpus source of each token's document, for windows ``windows`` of ``split``'s stream."""
    from core.pipeline.corpus import token_stream

    ids = np.asarray(token_stream(corpus / f"{split}.jsonl"))
    separators = np.flatnonzero(ids == bos)  # documents are joined by one BOS
    sources = [json.loads(line)["source"] for line in (corpus / f"{split}.jsonl").open()]
    if len(sources) != len(separators) + 1:
        raise ValueError(f"{split}: {len(sources)} documents but {len(separators)} separators")

    def lookup(where: torch.Tensor) -> list[str]:
        at = windows[where[:, 0].numpy()] * (context - 1) + where[:, 1].numpy() - 1
        return [sources[d] for d in np.searchsorted(separators, at)]

    return lookup


@torch.no_grad()
def silent_sources(s, side: dict, rows: torch.Tensor, ids: torch.Tensor,
                   threshold: torch.Tensor, lookup, tokenizer) -> dict:
    """Where the ``ids`` latents fire: tokens by corpus source (against the side's tokens by
    source), latents by source, and the tokens they fire on."""
    hit, fired = [], []
    for a in range(0, len(side["x"]), BATCH_TOKENS):
        f = pre_acts(s, side["x"][a:a + BATCH_TOKENS])[:, ids] > threshold[ids]
        rows_hit = torch.nonzero(f.any(1)).flatten()
        hit.append(rows_hit + a)
        fired.append(f[rows_hit])
    hit, fired = torch.cat(hit), torch.cat(fired)
    where = side["where"][hit]
    src = lookup(where)
    per_source: dict[str, set] = collections.defaultdict(set)
    for name, row in zip(src, fired):
        per_source[name].update(ids[row].tolist())
    toks = rows[where[:, 0], where[:, 1]].tolist()
    return {
        "tokens_by_source": dict(collections.Counter(lookup(side["where"])).most_common()),
        "firing_tokens_by_source": dict(collections.Counter(src).most_common()),
        "latents_by_source": {k: len(v) for k, v in sorted(per_source.items(),
                                                            key=lambda kv: -len(kv[1]))},
        "top_tokens": [[tokenizer.decode([t]), n] for t, n in
                       collections.Counter(toks).most_common(20)],
    }


# --- figures ----------------------------------------------------------------------------------


def side_figures(lm, s, side: dict, sets: dict, k: float, threshold: float, seed: int,
                 x_topk: bool = True) -> dict:
    out = {"tokens": side["tokens"], "windows": int(side["where"][:, 0].max()) + 1,
           "bos_positions": side["bos_positions"], "special_tokens": side["special_tokens"],
           "massive_tokens": side["massive_tokens"]}
    ordinary = side["counts"] - side["massive_counts"] - side["special_counts"]
    cutoffs: list = []
    topk = batch_topk_side(s, side["x"], k, seed, cutoffs) if x_topk else None
    out["batch_topk_cutoffs"] = cutoffs
    alive = side["counts"] > 0
    out["all_latents_fired"] = int(alive.sum())
    out["all_latents_fired_at_bos_positions"] = int((side["bos_counts"] > 0).sum())
    out["all_latents_fired_on_massive_tokens"] = int((side["massive_counts"] > 0).sum())
    out["all_latents_fired_on_special_tokens"] = int((side["special_counts"] > 0).sum())
    out["all_latents_fired_on_ordinary_tokens"] = int((ordinary > 0).sum())
    for name, ids in sets.items():
        pre = side["max_pre"][ids]
        fired = side["counts"][ids] > 0
        row = {"latents": len(ids),
               "fired_at_least_once": fired_among(side["counts"], ids),
               "firings": int(side["counts"][ids].sum()),
               "fired_3_or_more_times": int((side["counts"][ids] >= 3).sum()),
               "fired_on_ordinary_tokens": fired_among(ordinary, ids),
               "fired_on_special_tokens": fired_among(side["special_counts"], ids),
               "fired_on_massive_tokens": fired_among(side["massive_counts"], ids),
               "fired_at_bos_positions": fired_among(side["bos_counts"], ids),
               "fired_only_at_bos_positions": int(((side["bos_counts"][ids] > 0) & ~fired).sum()),
               "max_pre_activation_median": round(pre.median().item(), 1),
               "max_pre_activation_within_10pct_of_threshold":
                   int(((pre > 0.9 * threshold) & ~fired).sum())}
        if topk is not None:
            row["batch_topk_selected_at_least_once"] = fired_among(topk, ids)
            row["batch_topk_selections"] = int(topk[ids].sum())
        out[name] = row
    if topk is not None:
        out["all_latents_batch_topk_selected"] = int((topk > 0).sum())
    # where the silent latents' firings sit in the window
    by_pos = side["by_pos"].sum(1).double()  # keep = silent latents
    tok_pos = torch.bincount(side["where"][:, 1], minlength=CONTEXT).double()
    total = by_pos.sum().item()
    out["silent_firings_share_positions_1_16"] = (
        round(by_pos[1:EARLY + 1].sum().item() / total, 3) if total else None)
    out["token_share_positions_1_16"] = round(tok_pos[1:EARLY + 1].sum().item()
                                              / tok_pos.sum().item(), 3)
    return out


@torch.no_grad()
def long_figures(lm, s, rows: torch.Tensor, sets: dict, threshold: torch.Tensor) -> dict:
    """Firings of the silent / rare latents before and past position 127 in long windows."""
    bos = lm.tokenizer.bos_token_id
    early = {n: torch.zeros(len(ids), dtype=torch.long) for n, ids in sets.items()}
    late = {n: torch.zeros(len(ids), dtype=torch.long) for n, ids in sets.items()}
    late_ordinary = {n: torch.zeros(len(ids), dtype=torch.long) for n, ids in sets.items()}
    massive_early = massive_late = 0
    special = special_ids(lm.tokenizer)
    for chunk in rows.split(2):
        x = run_to_hooks(lm, [s.hook_name], chunk)[s.hook_name].float()
        fire = (pre_acts(s, x) > threshold) & (chunk != bos).unsqueeze(-1)
        is_special = torch.isin(chunk, special)
        massive = massive_tokens(x, chunk != bos) & ~is_special
        massive_early += int(massive[:, :CONTEXT].sum())
        massive_late += int(massive[:, CONTEXT:].sum())
        plain = fire & ~(massive | is_special).unsqueeze(-1)
        for n, ids in sets.items():
            early[n] += fire[:, :CONTEXT, ids].sum((0, 1))
            late[n] += fire[:, CONTEXT:, ids].sum((0, 1))
            late_ordinary[n] += plain[:, CONTEXT:, ids].sum((0, 1))
    body = rows != bos
    out = {"windows": rows.shape[0], "context": rows.shape[1],
           "tokens_positions_1_127": int(body[:, :CONTEXT].sum()),
           "tokens_positions_128_on": int(body[:, CONTEXT:].sum()),
           "massive_tokens_positions_1_127": massive_early,
           "massive_tokens_positions_128_on": massive_late}
    for n in sets:
        out[n] = {"fired_in_positions_1_127": int((early[n] > 0).sum()),
                  "fired_in_positions_128_on": int((late[n] > 0).sum()),
                  "fired_only_past_127": int(((late[n] > 0) & (early[n] == 0)).sum()),
                  "fired_past_127_on_ordinary_tokens": int((late_ordinary[n] > 0).sum())}
    return out


@torch.no_grad()
def samples_detail(lm, s, side: dict, docs: torch.Tensor, texts: list[str], silent: torch.Tensor,
                   threshold: float, top: int = 12) -> dict:
    """Which silent latents fire most on the samples, their tokens and openings."""
    counts = side["counts"][silent]
    order = torch.argsort(counts, descending=True)
    where = side["where"]
    doc_of = docs[where[:, 0], where[:, 1]]
    tok_of = side["rows"][where[:, 0], where[:, 1]]
    latents = []
    per_opening: dict[str, set] = collections.defaultdict(set)
    fired_ids = silent[counts > 0]
    w = s.sae.W_enc[:, fired_ids]
    pre = torch.cat([
        ((s.sae.process_sae_in(sae_input(s, x).to(s.sae.dtype)) @ w)
         + s.sae.b_enc[fired_ids]).float()
        for x in side["x"].split(4096)])
    t, j = torch.nonzero(pre > threshold, as_tuple=True)
    for ti, ji in zip(t.tolist(), j.tolist()):
        per_opening[opening_of(texts[int(doc_of[ti])])].add(int(fired_ids[ji]))
    column = {int(latent): c for c, latent in enumerate(fired_ids.tolist())}
    for i in order[:top].tolist():
        if counts[i] == 0:
            break
        latent = int(silent[i])
        col = pre[:, column[latent]]
        hits = torch.nonzero(col > threshold).flatten()
        toks = collections.Counter(int(tok_of[h]) for h in hits.tolist())
        best = int(hits[col[hits].argmax()])
        b, p = where[best].tolist()
        ctx = side["rows"][b, max(1, p - 12):p + 1].tolist()
        latents.append({
            "latent": latent, "firings": int(counts[i]),
            "documents": len({int(doc_of[h]) for h in hits.tolist()}),
            "top_tokens": [(lm.tokenizer.decode([t]), c) for t, c in toks.most_common(3)],
            "max_act_opening": opening_of(texts[int(doc_of[best])]),
            "max_act_context": lm.tokenizer.decode(ctx)})
    openings = sorted(((o, len(v)) for o, v in per_opening.items()), key=lambda r: -r[1])
    return {"most_firing_silent_latents": latents,
            "openings_by_silent_latents_firing": openings[:15],
            "openings_in_sample": len({opening_of(t) for t in texts})}


def samples_share(root: Path = EMBEDDED_SAE_DIR) -> float:
    """The samples corpus's share of the text the family was trained on (train splits)."""
    def train_tokens(name: str) -> int:
        splits = json.loads((root / name).read_text())["splits"]["train"]
        return sum(v["tokens"] for v in splits.values())

    extra = train_tokens("samples-manifest.json")
    return extra / (extra + train_tokens("corpus-manifest.json"))


@torch.no_grad()
def fired_curve(s, x: torch.Tensor, ids: torch.Tensor, threshold: torch.Tensor,
                points: int = 8) -> list[list[int]]:
    """``[tokens, latents of ids fired so far]`` at ``points`` even steps through ``x`` (SAE
    inputs in window order): how the count grows with the tokens read."""
    seen = torch.zeros(len(ids), dtype=torch.bool)
    marks = {round(len(x) * (i + 1) / points) for i in range(points)}
    out, start = [], 0
    for end in sorted(marks):
        for a in range(start, end, BATCH_TOKENS):
            b = min(a + BATCH_TOKENS, end)
            seen |= (pre_acts(s, x[a:b])[:, ids] > threshold[ids]).any(0)
        out.append([end, int(seen.sum())])
        start = end
    return out


def topk_block(lm, s, held: torch.Tensor, samples_x: torch.Tensor, sets: dict, k: float,
               threshold: torch.Tensor, seed: int, label: str = "heldout-index",
               keep: dict | None = None) -> dict:
    """Windows ``held`` (every held-out window of the index, inside the card's count; or as many
    windows of the training text) as saved (JumpReLU) and as trained (BatchTopK over shuffled
    batches), alone and with samples mixed in at their share of the training text."""
    t = time.time()
    side = run_side(lm, s, held, sets["silent"], threshold)
    share = samples_share()
    n_samples = min(len(samples_x), round(len(side["x"]) * share / (1 - share)))
    out = {"tokens": side["tokens"], "windows": held.shape[0],
           "samples_share_of_training_text": round(share, 4), "samples_tokens_mixed": n_samples}
    cut_held: list = []
    cut_mix: list = []
    topk = batch_topk_side(s, side["x"], k, seed, cut_held)
    mixed = batch_topk_side(s, torch.cat([side["x"], samples_x[:n_samples]]), k, seed, cut_mix)
    for name, ids in sets.items():
        out[name] = {"jumprelu_fired_at_least_once": fired_among(side["counts"], ids),
                     "jumprelu_firings": int(side["counts"][ids].sum()),
                     "batch_topk_selected_at_least_once": fired_among(topk, ids),
                     "batch_topk_selections": int(topk[ids].sum()),
                     "batch_topk_with_samples_selected_at_least_once": fired_among(mixed, ids),
                     "batch_topk_with_samples_selections": int(mixed[ids].sum())}
    out["all_latents_jumprelu_fired"] = int((side["counts"] > 0).sum())
    out["all_latents_batch_topk_selected"] = int((topk > 0).sum())
    out["silent_jumprelu_fired_by_tokens"] = fired_curve(s, side["x"], sets["silent"], threshold)
    out["batch_topk_cutoffs"] = cut_held
    out["batch_topk_with_samples_cutoffs"] = cut_mix
    out["seconds"] = round(time.time() - t, 1)
    print(label, json.dumps(out), file=sys.stderr, flush=True)
    if keep is not None:
        keep.update(side)
    return out


def main() -> None:
    parser = arguments(__doc__)
    parser.add_argument("--tokens", type=int, default=24_000,
                        help="tokens per side (whole windows); samples are generated to this")
    parser.add_argument("--seed", type=int, default=1,
                        help="sampling seed (the shipped samples used 0)")
    parser.add_argument("--samples-dir", type=Path,
                        default=Path.home() / ".cache/sae-workbench/samples-seed1")
    parser.add_argument("--sample-batch", type=int, default=32)
    parser.add_argument("--index", type=Path, default=ROOT / "data/index/embedded.duckdb")
    parser.add_argument("--sae", default="w4096")
    parser.add_argument("--no-long", action="store_true", help="skip the 1,024-token windows")
    parser.add_argument("--no-topk-heldout", action="store_true",
                        help="skip BatchTopK over the index's whole held-out text")
    parser.add_argument("--train-corpus", type=Path, default=None,
                        help="a rebuild of the shipped corpus: also run as many windows of its "
                             "train split, as the training stream took them, as the held-out pass")
    parser.add_argument("--train-windows", type=int, default=0,
                        help="training windows to run (0: as many as the held-out pass)")
    parser.add_argument("--no-sides", action="store_true",
                        help="skip the three 24k-token sides (samples are still loaded)")
    parser.add_argument("--heldout-windows", type=int, default=0,
                        help="index windows for that pass (0: all 1,181)")
    args = parse(parser)
    t0 = time.time()
    lm = load_model(ModelSpec(device=args.device))
    s = load_sae(SaeSpec("embedded", args.sae), lm)
    counts, card_tokens = load_firing_counts(EMBEDDED_SAE_DIR / "firing_counts.safetensors")
    sets = card_sets(counts[args.sae])
    threshold_t = s.sae.threshold.float()
    threshold = float(threshold_t.max())
    k = float(json.loads((EMBEDDED_SAE_DIR / args.sae / "cfg.json").read_text())["metadata"]
              ["training_architecture_details"]["k"])
    n_windows = -(-args.tokens // (CONTEXT - 1))

    # samples, made as the corpus source makes them
    cfg = CorpusConfig(out_dir=args.samples_dir, seed=args.seed, sources=("samples",),
                       sample_tokens=args.tokens, sample_batch=args.sample_batch)
    t = time.time()
    docs = cached_samples(args.samples_dir / f"samples-seed{args.seed}.jsonl", lm, cfg)
    sample_seconds = time.time() - t
    texts = [d.text for d in docs]
    tracked = list(tracked_windows(lm, texts, CONTEXT))
    n_windows = min(n_windows, len(tracked))
    tracked = tracked[:n_windows]
    sample_rows = torch.tensor([r for r, _ in tracked])
    sample_docs = torch.tensor([d for _, d in tracked])

    held = heldout_rows(args.index)
    # the index's windows are the card's: the shipped held-out sample, cut the same way
    sample_path = EMBEDDED_SAE_DIR / "heldout_sample.jsonl"
    mine = list(windows(lm, (json.loads(line)["text"] for line in sample_path.open()), CONTEXT))
    same_as_card = sum(torch.equal(torch.tensor(r), held[i]) for i, r in enumerate(mine))
    held_rows = held[:n_windows]
    py_rows, py_meta = python_rows(lm, n_windows, args.seed)

    figures = {
        "sae": args.sae, "threshold": threshold, "k": k, "context": CONTEXT,
        "card": {"tokens": card_tokens, "silent": len(sets["silent"]),
                 "rare_1_to_5": len(sets["rare"]), "sae_lens_dead_last_window": json.loads(
                     (EMBEDDED_SAE_DIR / args.sae / "cfg.json").read_text())["metadata"]
                 ["num_dead_features"],
                 "latents_fired_exactly_k_times_k_0_to_10": [
                     int((counts[args.sae] == i).sum()) for i in range(11)],
                 "good_toulmin_more_firing_on_another_equal_count": round(
                     good_toulmin(counts[args.sae], 1.0), 1)},
        "model_dtype": str(lm.dtype), "device": str(lm.device),
        "samples_generation": {"seed": args.seed, "documents": len(docs),
                               "batch": args.sample_batch, "new_tokens": 192,
                               "temperature": 1.0, "top_k": 50, "top_p": 0.95,
                               "seconds_this_run": round(sample_seconds, 1)},
        "heldout_index_windows_equal_to_card_windowing_of_heldout_sample":
            f"{same_as_card} of {len(mine)}",
        "python_source": py_meta,
        "sides": {},
    }
    sides = {}
    kinds = [("samples", sample_rows), ("heldout", held_rows), ("python-source", py_rows)]
    for name, rows in kinds[:1] if args.no_sides else kinds:
        t = time.time()
        side = run_side(lm, s, rows, sets["silent"], threshold_t)
        side["rows"] = rows
        sides[name] = side
        figures["sides"][name] = side_figures(lm, s, side, sets, k, threshold, args.seed)
        figures["sides"][name]["seconds"] = round(time.time() - t, 1)
        print(name, json.dumps(figures["sides"][name]), file=sys.stderr, flush=True)
    ids_silent = sets["silent"]
    if not args.no_topk_heldout:
        figures["batch_topk_heldout_index"] = topk_block(
            lm, s, held[:args.heldout_windows or None], sides["samples"]["x"], sets, k,
            threshold_t, args.seed)
    if args.train_corpus is not None:
        bos = lm.tokenizer.bos_token_id
        rows, taken, meta = trained_rows(
            args.train_corpus, args.train_windows or len(held[:args.heldout_windows or None]),
            bos)
        side: dict = {}
        figures["batch_topk_train_windows"] = {**meta, **topk_block(
            lm, s, rows, sides["samples"]["x"], sets, k, threshold_t, args.seed, "train", side)}
        figures["batch_topk_train_windows"]["silent_sources"] = silent_sources(
            s, side, rows, sets["silent"], threshold_t,
            source_lookup(args.train_corpus, "train", taken, CONTEXT, bos), lm.tokenizer)
    if "python-source" in sides:
        figures["silent_firing_on_samples_and_python_source"] = int(
            ((sides["samples"]["counts"][ids_silent] > 0)
             & (sides["python-source"]["counts"][ids_silent] > 0)).sum())
        figures["silent_firing_on_samples_or_python_source"] = int(
            ((sides["samples"]["counts"][ids_silent] > 0)
             | (sides["python-source"]["counts"][ids_silent] > 0)).sum())
    figures["samples_detail"] = samples_detail(lm, s, sides["samples"], sample_docs, texts,
                                               ids_silent, threshold)
    if not args.no_long:
        figures["long_context"] = {}
        for name, rows in (("samples", sample_rows), ("heldout", held_rows)):
            t = time.time()
            long_rows = long_windows(lm, stream_of(rows), args.tokens)
            figures["long_context"][name] = long_figures(lm, s, long_rows, sets, threshold_t)
            figures["long_context"][name]["seconds"] = round(time.time() - t, 1)
            print(name, "long", json.dumps(figures["long_context"][name]), file=sys.stderr,
                  flush=True)
    figures["seconds"] = round(time.time() - t0, 1)
    save("silent_latents", figures, args.device)


if __name__ == "__main__":
    main()
