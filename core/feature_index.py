"""Read the feature index: one latent's dashboard, searches, and what fires on a text."""

from __future__ import annotations

import hashlib
import json
import math
import re
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import torch

from core.hooks import run_to_hooks
from core.index import ACTS_SCALE, READABLE_VERSIONS, SCHEMA_VERSION, span_bounds, unpack_spans
from core.models import EMBEDDED_MODEL_NAME, LoadedModel, cache_dir
from core.saes import DATA_DIR, LoadedSAE, sae_input
from core.text import check_text, token_ids

REBUILD = "Rebuild it on the Feature lookup page or with `python -m core.index` (see README)."
EMBEDDED_INDEX = DATA_DIR / "index" / "embedded.duckdb"


def built_index_location(lm: LoadedModel, s: LoadedSAE) -> tuple[Path, str]:
    """(index file, name of the SAE inside it) for an index the app builds: always a file in
    the cache directory keyed by model and SAE, never a shipped file."""
    name = s.spec.name if s.spec.source == "local" else s.spec.label
    key = f"{lm.name}|{s.spec.source}|{name}|{s.spec.sae_id}"
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", s.spec.label)[:60]
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    return cache_dir() / "index" / f"{slug}-{digest}.duckdb", s.spec.label


def index_candidates(lm: LoadedModel, s: LoadedSAE) -> list[tuple[Path, str]]:
    """Where the SAE's index may be, in order: the shipped index (embedded family on the
    embedded model), then the one the app builds in the cache directory."""
    found = []
    if s.spec.source == "embedded" and lm.name == EMBEDDED_MODEL_NAME:
        found.append((EMBEDDED_INDEX, s.spec.name))
    found.append(built_index_location(lm, s))
    return found


def index_location(lm: LoadedModel, s: LoadedSAE) -> tuple[Path, str]:
    """(index file, SAE name in it) to read: the first candidate whose file exists and opens
    with this SAE in it, else the last candidate (where a build would go)."""
    candidates = index_candidates(lm, s)
    for path, name in candidates:
        if not path.exists():
            continue
        try:
            if name in open_index(path).saes:
                return path, name
        except (ValueError, FileNotFoundError):
            continue
    return candidates[-1]


@dataclass
class Example:
    """One activating token in context."""

    seq: int
    pos: int
    value: float
    token_ids: list[int]
    """The whole window the token sits in (it starts with BOS)."""
    acts_start: int = 0
    acts: list[float] | None = None
    """The latent's activation at ``token_ids[acts_start:acts_start + len(acts)]``, stored by
    the build (``None`` in a version-1 index: recompute with :func:`window_activations`)."""


@dataclass
class LatentData:
    """Everything the Lookup page shows for one latent."""

    sae: str
    latent: int
    d_sae: int
    firing_rate: float
    firing_count: int
    max_act: float
    mean_act: float
    enc_dec_cos: float
    hist_counts: list[int]
    hist_max: float
    sample_size: int
    logit_pos: list[tuple[int, float]]
    logit_neg: list[tuple[int, float]]
    neighbours: list[tuple[int, float]]
    top: list[Example]
    intervals: list[tuple[int, float, float, Example]]
    """(interval, lo, hi, example), highest interval first."""

    def to_json(self, tokenizer) -> str:
        data = asdict(self)
        decode = lambda i: tokenizer.convert_ids_to_tokens(int(i))  # noqa: E731
        data["logit_pos"] = [(decode(t), v) for t, v in self.logit_pos]
        data["logit_neg"] = [(decode(t), v) for t, v in self.logit_neg]
        for ex in data["top"]:
            ex["tokens"] = [decode(t) for t in ex.pop("token_ids")]
        for item in data["intervals"]:
            item[3]["tokens"] = [decode(t) for t in item[3].pop("token_ids")]
        return json.dumps(data, indent=1)


class FeatureIndex:
    """A read-only view of an index file; every method is one or two SQL queries."""

    def __init__(self, path: Path | str):
        import duckdb

        self.path = Path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"No feature index at {self.path}. {REBUILD}")
        try:
            self.con = duckdb.connect(str(self.path), read_only=True)
            meta = dict(self.con.execute("SELECT key, value FROM meta").fetchall())
        except Exception as exc:  # duckdb raises several error types for damaged files
            raise ValueError(f"The feature index {self.path} is unreadable ({exc}). "
                             f"{REBUILD}") from exc
        version = int(meta.get("schema_version", 0))
        if version not in READABLE_VERSIONS:
            self.con.close()
            raise ValueError(f"The feature index {self.path} has schema version {version}; this "
                             f"version reads {SCHEMA_VERSION}. {REBUILD}")
        self.meta = meta
        self.version = version
        self.show_left = int(meta.get("show_left", 24))
        self.show_right = int(meta.get("show_right", 6))
        """The span around each example whose activations the index stores (version 2)."""
        self.identity = _identity(self.path)
        """The file this connection reads (a rebuild replaces it; see :func:`open_index`)."""
        self._lock = threading.Lock()  # one DuckDB connection, shared by every session
        self.context_size = int(meta["context_size"])
        self._saes = {row[0]: row for row in self._q(
            "SELECT sae, d_sae, hook, label FROM saes ORDER BY d_sae").fetchall()}

    def close(self) -> None:
        self.con.close()

    def _q(self, sql: str, params: list | dict | None = None):
        """Run a query on a cursor of its own (DuckDB connections are not thread-safe)."""
        with self._lock:
            cur = self.con.cursor()
        return cur.execute(sql, params or [])

    @property
    def saes(self) -> list[str]:
        return list(self._saes)

    def d_sae(self, sae: str) -> int:
        self._check_sae(sae)
        return int(self._saes[sae][1])

    def _check_sae(self, sae: str) -> None:
        if sae not in self._saes:
            raise ValueError(f"The index has no SAE {sae!r}; it holds {', '.join(self._saes)}.")

    def check_latent(self, sae: str, latent: int) -> int:
        d = self.d_sae(sae)
        if not isinstance(latent, (int, np.integer)) or not 0 <= latent < d:
            raise ValueError(f"Latent {latent!r} is out of range: {sae} has latents 0 to {d - 1}.")
        return int(latent)

    def sae_stats(self, sae: str) -> dict:
        self._check_sae(sae)
        cur = self._q("SELECT * FROM saes WHERE sae = ?", [sae])
        cols = [c[0] for c in cur.description]
        stats = dict(zip(cols, cur.fetchone()))
        stats.setdefault("density_tokens", stats["tokens"])  # indexes built before it was kept
        return stats

    def sequences(self, seqs: list[int]) -> dict[int, list[int]]:
        if not seqs:
            return {}
        rows = self._q("SELECT seq, token_ids FROM sequences WHERE seq IN "
                                f"({','.join('?' * len(seqs))})", list(seqs)).fetchall()
        return {int(s): list(t) for s, t in rows}

    def latent(self, sae: str, latent: int) -> LatentData:
        latent = self.check_latent(sae, latent)
        cur = self._q("SELECT * FROM latents WHERE sae = ? AND latent = ?", [sae, latent])
        cols = [c[0] for c in cur.description]
        row = dict(zip(cols, cur.fetchone()))
        tops = self._q("SELECT token, value FROM top_examples WHERE sae = ? AND "
                       "latent = ? ORDER BY rank", [sae, latent]).fetchall()
        ivals = self._q("SELECT interval, lo, hi, token, value FROM interval_samples "
                        "WHERE sae = ? AND latent = ? ORDER BY interval DESC, value DESC",
                        [sae, latent]).fetchall()
        seqs = self.sequences(sorted({t // self.context_size for t, _ in tops}
                                     | {r[3] // self.context_size for r in ivals}))
        ctx = self.context_size
        top_spans, ival_spans = [None] * len(tops), {}
        if self.version >= 2 and (tops or ivals):
            blob = self._q("SELECT spans FROM shown_spans WHERE sae = ? AND latent = ?",
                           [sae, latent]).fetchone()
            if blob is not None:
                top_spans, ival_spans = unpack_spans(
                    blob[0], [t % ctx for t, _ in tops],
                    [(i, t, t % ctx) for i, _, _, t, _ in ivals], self.show_left,
                    self.show_right, ctx)
        unit = float(row["max_act"]) / ACTS_SCALE

        def example(token: int, value: float, span) -> Example:
            seq, pos = divmod(int(token), ctx)
            if span is None:
                return Example(seq, pos, float(value), seqs[seq])
            first, _ = span_bounds(pos, self.show_left, self.show_right, ctx)
            return Example(seq, pos, float(value), seqs[seq], first,
                           (span.astype(np.float64) * unit).tolist())

        return LatentData(
            sae=sae, latent=latent, d_sae=self.d_sae(sae), firing_rate=row["firing_rate"],
            firing_count=row["firing_count"], max_act=row["max_act"], mean_act=row["mean_act"],
            enc_dec_cos=row["enc_dec_cos"], hist_counts=list(row["hist_counts"]),
            hist_max=row["hist_max"], sample_size=row["sample_size"],
            logit_pos=list(zip(row["logit_pos_ids"], row["logit_pos_vals"])),
            logit_neg=list(zip(row["logit_neg_ids"], row["logit_neg_vals"])),
            neighbours=list(zip(row["neighbour_ids"], row["neighbour_cos"])),
            top=[example(t, v, span) for (t, v), span in zip(tops, top_spans)],
            intervals=[(i, lo, hi, example(t, v, ival_spans.get((i, t))))
                       for i, lo, hi, t, v in ivals],
        )

    def sequence_count(self) -> int:
        """How many windows of ``context_size`` tokens the index holds."""
        return int(self._q("SELECT count(*) FROM sequences").fetchone()[0])

    def texts(self, tokenizer) -> list[str]:
        """The indexed windows as text (to index another SAE or model on the same corpus)."""
        rows = self._q("SELECT token_ids FROM sequences ORDER BY seq").fetchall()
        return [tokenizer.decode(ids, skip_special_tokens=True) for (ids,) in rows]

    def alive_latents(self, sae: str, with_examples: bool = False) -> list[int]:
        """Latents that are alive (not :func:`core.density.is_dead`: fired at least once on the
        counted tokens, which may be more than the indexed ones); ``with_examples`` keeps those
        that also fired on the indexed tokens, so they have examples to show (what a "random
        alive latent" picks: a latent seen a few times in 2M tokens may have none here)."""
        self._check_sae(sae)
        extra = " AND max_act > 0" if with_examples else ""
        return [r[0] for r in self._q(
            "SELECT latent FROM latents WHERE sae = ? AND firing_count > 0" + extra
            + " ORDER BY latent", [sae]).fetchall()]

    def summary(self, sae: str, latents: list[int] | None = None):
        """One row per latent (all, or those listed), by latent: ``latent``, ``firing_rate``,
        ``firing_count``, ``max_act``, ``mean_act`` (mean when firing) and ``logit_pos_ids``
        (top logit-lens tokens)."""
        self._check_sae(sae)
        sql = ("SELECT latent, firing_rate, firing_count, max_act, mean_act, logit_pos_ids "
               "FROM latents WHERE sae = ?")
        params: list = [sae]
        if latents is not None:
            if not latents:
                sql += " AND false"
            else:
                sql += f" AND latent IN ({','.join('?' * len(latents))})"
                params += [int(i) for i in latents]
        return self._q(sql + " ORDER BY latent", params).df()

    def top_token_counts(self, sae: str) -> list[tuple[int, int, int]]:
        """(latent, token id, count): how often each token is the activating token of a
        latent's top examples."""
        self._check_sae(sae)
        return [(int(lat), int(tok), int(n)) for lat, tok, n in self._q("""
            SELECT e.latent, s.token_ids[e.token % $ctx + 1] AS tok, count(*) AS n
            FROM top_examples e JOIN sequences s ON s.seq = e.token // $ctx
            WHERE e.sae = $sae GROUP BY ALL
        """, {"ctx": self.context_size, "sae": sae}).fetchall()]

    def search_tokens(self, sae: str, text: str, tokenizer, limit: int = 50):
        """Latents whose top logit tokens or top activating tokens contain ``text``."""
        import pandas as pd

        self._check_sae(sae)
        needle = text.strip().lower()
        if not needle:
            raise ValueError("Type a token or a piece of a word to search for.")
        vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        wanted = [i for i, t in enumerate(vocab)
                  if t and needle in t.replace("▁", " ").replace("Ġ", " ").lower()]
        if not wanted:
            return pd.DataFrame(columns=["latent", "match", "firing_rate", "max_act"])
        rows = self._q("""
            WITH logit AS (
                SELECT latent, 'logit lens' AS match, firing_rate, max_act FROM latents
                WHERE sae = $sae AND list_has_any(logit_pos_ids, $wanted::INTEGER[])
            ), acts AS (
                SELECT e.latent, 'top activations' AS match, l.firing_rate, l.max_act
                FROM top_examples e JOIN sequences s ON s.seq = e.token // $ctx
                JOIN latents l ON l.sae = e.sae AND l.latent = e.latent
                WHERE e.sae = $sae
                  AND list_contains($wanted::INTEGER[], s.token_ids[e.token % $ctx + 1])
                GROUP BY ALL HAVING count(*) >= 3
            )
            SELECT latent, string_agg(DISTINCT match, ', ') AS match,
                   max(firing_rate) AS firing_rate, max(max_act) AS max_act
            FROM (SELECT * FROM logit UNION ALL SELECT * FROM acts)
            GROUP BY latent ORDER BY max_act DESC LIMIT $limit
        """, {"sae": sae, "wanted": wanted, "ctx": self.context_size, "limit": limit}).df()
        return rows


def _identity(path: Path) -> tuple[int, int, int]:
    st = Path(path).stat()
    return st.st_ino, st.st_mtime_ns, st.st_size


_open: dict[str, FeatureIndex] = {}
_open_lock = threading.Lock()


def open_index(path: Path | str) -> FeatureIndex:
    """The index at ``path``, one shared instance per file. When a build has replaced the file,
    the old connection is closed first: DuckDB keeps serving a database it still has open from
    its own cache, so opening the new file beside it would read the old one."""
    key = str(Path(path).resolve())
    if not Path(key).exists():
        raise FileNotFoundError(f"No feature index at {path}. {REBUILD}")
    with _open_lock:
        current = _open.get(key)
        if current is not None and current.identity == _identity(Path(key)):
            return current
        if current is not None:
            current.close()
            del _open[key]
        index = FeatureIndex(key)
        _open[key] = index
        return index


@torch.no_grad()
def encode_tokens(lm: LoadedModel, s: LoadedSAE, ids: torch.Tensor) -> torch.Tensor:
    """Latent activations ``[batch, pos, d_sae]`` (float32, CPU) for token ids; BOS reads 0
    because the index never counts it as firing."""
    acts = run_to_hooks(lm, [s.hook_name], ids.to(lm.device))[s.hook_name]
    feats = s.sae.encode(sae_input(s, acts).to(s.sae.dtype)).float().cpu()
    feats[ids.cpu() == lm.tokenizer.bos_token_id] = 0
    return feats


def window_activations(lm: LoadedModel, s: LoadedSAE, windows_ids: list[list[int]],
                       latent: int) -> list[list[float]]:
    """The latent's activation at every token of each window."""
    if not windows_ids:
        return []
    return encode_tokens(lm, s, torch.tensor(windows_ids))[..., latent].tolist()


@dataclass
class Firing:
    """What fires on a text: every latent firing at each token, and the latents over the text."""

    tokens: list[int]
    active: list[list[tuple[int, float]]]
    """Per token, every latent firing there, strongest first (empty at BOS)."""
    overall: list[tuple[int, float, int]]
    """(latent, max activation, tokens it fires on), strongest first."""
    maxima: np.ndarray
    """Every latent's max activation over the text (BOS excluded)."""
    counts: np.ndarray
    """How many tokens of the text every latent fires on."""


RANKINGS = {"relative": "activation ÷ its typical activation", "activation": "activation"}
"""How :func:`strongest` ranks the latents that fire on a text."""


class Strong(NamedTuple):
    latent: int
    value: float
    """Max activation over the text."""
    relative: float
    """``value`` over the latent's mean activation when firing in the index (NaN: it never
    fired there, so it has no typical activation; ranked after the others)."""
    count: int
    """Tokens of the text it fires on."""


def strongest(fired: Firing, typical: np.ndarray, dense: np.ndarray,
              by: Literal["relative", "activation"] = "relative", hide_dense: bool = True,
              top: int = 20) -> list[Strong]:
    """The latents that fire most on a text, ranked by raw activation or by activation relative
    to each latent's ``typical`` one (its mean when firing on the indexed corpus), so latents
    that fire everywhere do not drown the rest; ``dense`` (a mask) drops the dense ones."""
    if by not in RANKINGS:
        raise ValueError(f"by={by!r}; use one of {', '.join(RANKINGS)}.")
    value = fired.maxima.astype(np.float64)
    typical = np.asarray(typical, np.float64)
    known = typical > 0
    relative = np.full_like(value, np.nan)
    relative[known] = value[known] / typical[known]
    keep = value > 0
    if hide_dense:
        keep &= ~np.asarray(dense, bool)
    if by == "relative":  # known ratios first, highest first; then the rest by activation
        order = np.lexsort((-value, -np.nan_to_num(relative, nan=-1.0), ~known))
    else:
        order = np.argsort(-value, kind="stable")
    order = [int(i) for i in order if keep[i]][:top]
    return [Strong(i, float(value[i]), float(relative[i]), int(fired.counts[i])) for i in order]


def token_tops(fired: Firing, typical: np.ndarray, dense: np.ndarray,
               by: Literal["relative", "activation"] = "relative", hide_dense: bool = True,
               top: int = 5) -> list[list[Strong]]:
    """Per token, its ``top`` latents ranked as :func:`strongest` ranks a whole text (``value``:
    the activation at that token, ``count``: 1)."""
    if by not in RANKINGS:
        raise ValueError(f"by={by!r}; use one of {', '.join(RANKINGS)}.")
    typical = np.asarray(typical, np.float64)
    dense = np.asarray(dense, bool)
    out = []
    for row in fired.active:
        cands = [(i, v) for i, v in row if not (hide_dense and dense[i])]
        rel = [v / typical[i] if typical[i] > 0 else math.nan for i, v in cands]
        if by == "relative":  # known ratios first, highest first; then the rest by activation
            key = [(math.isnan(r), -(0.0 if math.isnan(r) else r), -v)
                   for (_, v), r in zip(cands, rel)]
        else:
            key = [(-v,) for _, v in cands]
        order = sorted(range(len(cands)), key=key.__getitem__)[:top]
        out.append([Strong(cands[j][0], cands[j][1], rel[j], 1) for j in order])
    return out


@torch.no_grad()
def what_fires(lm: LoadedModel, s: LoadedSAE, text: str, top: int = 5,
               max_tokens: int = 1024) -> Firing:
    """Every latent firing at each token, and the ``top`` × 4 (at least 20) strongest over the
    whole text (BOS excluded)."""
    check_text(text, "text")
    ids = token_ids(lm, text, prepend_bos=s.processing.prepend_bos)
    if len(ids) > max_tokens:
        raise ValueError(f"The text has {len(ids):,} tokens; the limit is {max_tokens:,}. "
                         "Shorten it.")
    feats = encode_tokens(lm, s, torch.tensor([ids]))[0]
    active = []
    for row in feats:
        idx = torch.nonzero(row > 0).flatten()
        vals, order = row[idx].sort(descending=True)
        active.append([(int(i), float(v)) for i, v in zip(idx[order], vals)])
    mx = feats.max(0).values
    count = (feats > 0).sum(0)
    order = mx.argsort(descending=True)
    overall = [(int(i), float(mx[i]), int(count[i])) for i in order[:max(top * 4, 20)]
               if mx[i] > 0]
    return Firing(ids, active, overall, mx.numpy(), count.numpy())
