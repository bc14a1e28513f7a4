"""Feature maps: UMAP of every decoder direction of an SAE family, HDBSCAN clusters, split lineage.

A *family* is several SAEs on the same hook (the embedded w512…w4096, Gemma Scope widths, the
``gpt2-small-res-jb-feature-splitting`` release). Feature splitting (one latent of a narrow SAE
becoming several in a wider one) shows on one map of all their decoder directions:

* a 2-D UMAP (cosine metric) to look at, and optionally a 10-D UMAP clustered with HDBSCAN
  (the ``hdbscan`` package: 0.14 s on the embedded family against 0.26 s for scikit-learn's);
* lineage: for each latent of a narrower SAE its ``lineage_k`` nearest latents by decoder cosine
  in the next wider SAE.

The k nearest neighbours are computed once, exactly (chunked matrix products), and handed to both
UMAP runs. Maps persist keyed by (family, parameters): the family key hashes every member's name
and decoder weights, so a retrained SAE never shows a stale map. Lookup order: the shipped index
(``data/index/embedded.duckdb``, written only by the command line in ``core.map_store``, which
writes a copy and moves it into place), then ``<cache>/index/maps.duckdb``. Each map is written
in one transaction, so a killed computation leaves no half map.

    python -m core.map_store               # default map of the embedded family → shipped index
    python -m core.map_store --widths w512 w1024 --out /tmp/maps.duckdb --n-neighbors 30
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
import torch

from core.labels import token_text
from core.feature_index import EMBEDDED_INDEX
from core.models import LoadedModel, Progress, cache_dir, log_progress
from core.saes import EMBEDDED_SAE_DIR, LoadedSAE, embedded_saes, sae_param

log = logging.getLogger(__name__)

N_TOKENS = 5
"""Top logit-lens tokens shown per latent."""
MAX_LATENTS = 150_000
BF16_MIN_ELEMENTS = 4_000_000
"""Decoder matrices at least this large (latents × d_in) take bf16 neighbour candidates."""


@dataclass(frozen=True)
class MapConfig:
    """How to draw and cluster a map (defaults: the feature-splitting notebook's)."""

    n_neighbors: int = 15
    """UMAP neighbourhood size, for both the 2-D map and the clustering embedding."""
    min_dist: float = 0.05
    """UMAP min_dist of the 2-D map."""
    cluster: bool = True
    """Also compute a ``cluster_dims``-D UMAP and cluster it with HDBSCAN."""
    cluster_dims: int = 10
    """Dimensions of the clustering embedding."""
    cluster_min_dist: float = 0.1
    """UMAP min_dist of the clustering embedding."""
    min_cluster_size: int = 3
    """HDBSCAN min_cluster_size."""
    lineage_k: int = 3
    """Nearest latents in the next wider SAE kept per latent."""
    n_epochs: int | None = 200
    """UMAP epochs; None is UMAP's rule (500 below 10,000 points, 200 above). 200 keeps 97% of
    the 500-epoch maps' neighbour recall on the embedded family, and their clusters differ from
    500 epochs' (ARI 0.54–0.58) about as much as two 500-epoch seeds do (0.60), in 2.5× less
    time."""
    metric: Literal["cosine", "euclidean"] = "cosine"
    """Distance between decoder directions (euclidean uses the raw, unnormalised rows)."""
    seed: int = 0
    """UMAP random_state: the same seed gives the same map."""

    def __post_init__(self) -> None:
        if not isinstance(self.n_neighbors, int) or self.n_neighbors < 2:
            raise ValueError(f"n_neighbors={self.n_neighbors!r}: use an integer of at least 2 "
                             "(the notebook uses 15).")
        for name in ("min_dist", "cluster_min_dist"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value!r}: use a value between 0 and 1 (UMAP's "
                                 "spread is 1).")
        if not isinstance(self.cluster_dims, int) or self.cluster_dims < 2:
            raise ValueError(f"cluster_dims={self.cluster_dims!r}: use an integer of at least "
                             "2 (the notebook uses 10).")
        if not isinstance(self.min_cluster_size, int) or self.min_cluster_size < 2:
            raise ValueError(f"min_cluster_size={self.min_cluster_size!r}: use an integer of "
                             "at least 2.")
        if not isinstance(self.lineage_k, int) or not 1 <= self.lineage_k <= 50:
            raise ValueError(f"lineage_k={self.lineage_k!r}: use an integer from 1 to 50.")
        if self.n_epochs is not None and (not isinstance(self.n_epochs, int)
                                          or self.n_epochs < 10):
            raise ValueError(f"n_epochs={self.n_epochs!r}: use None (UMAP's default) or at "
                             "least 10.")
        if self.metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric={self.metric!r}: use 'cosine' or 'euclidean'.")

    @property
    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]


@dataclass(eq=False)
class Member:
    """One SAE of a family, reduced to what a map needs."""

    name: str
    """How the map names it (``w512``)."""
    w_dec: np.ndarray
    """Decoder directions ``[d_sae, d_in]``."""
    hook: str = ""
    """Hook the SAE reads; empty when unknown (then not checked)."""
    spec: str = ""
    """The ``sae=`` parameter that loads it (``embedded:w512``); empty when none does."""
    top_tokens: list[str] | None = None
    """Top logit-lens tokens per latent, already joined for display."""
    firing_rate: np.ndarray | None = None
    labels: list[str] | None = None

    @property
    def d_sae(self) -> int:
        return int(self.w_dec.shape[0])

    @property
    def d_in(self) -> int:
        return int(self.w_dec.shape[1])


@dataclass
class FeatureMap:
    """A computed (or loaded) map: one row per latent, and the lineage between widths."""

    family_key: str
    config: MapConfig
    members: list[dict]
    """name, d_sae, d_in, hook, spec per SAE, narrowest first."""
    points: pd.DataFrame
    """sae, width, latent, x, y, cluster (-1: noise or not clustered), top_tokens,
    firing_rate (NaN: unknown), label."""
    lineage: pd.DataFrame
    """sae, latent, child_sae, child_latent, cosine, rank (0 = nearest)."""
    seconds: float
    source: str = "computed"
    """computed, or the file it was loaded from."""

    @property
    def map_id(self) -> str:
        return f"{self.family_key}-{self.config.key}"


# --- families ---------------------------------------------------------------------------------


def _member(name: str, item: Member | LoadedSAE | np.ndarray | torch.Tensor) -> Member:
    if isinstance(item, Member):
        return item
    if isinstance(item, LoadedSAE):
        return Member(name, item.sae.W_dec.detach().float().cpu().numpy(), item.hook_name,
                      sae_param(item.spec))
    if isinstance(item, torch.Tensor):
        item = item.detach().float().cpu().numpy()
    if isinstance(item, np.ndarray):
        return Member(name, item)
    raise ValueError(f"Family member {name!r} is a {type(item).__name__}; pass a decoder "
                     "matrix, a LoadedSAE or a core.maps.Member.")


def check_family(family: Mapping[str, Member | LoadedSAE | np.ndarray]) -> list[Member]:
    """The members narrowest first; ValueError when they cannot share one map."""
    members = [_member(name, item) for name, item in family.items()]
    if not members:
        raise ValueError("The family is empty: pick at least one SAE.")
    for m in members:
        if m.w_dec.ndim != 2 or m.d_sae == 0:
            raise ValueError(f"{m.name}: the decoder must be a non-empty [d_sae, d_in] matrix, "
                             f"not shape {tuple(m.w_dec.shape)}.")
        if not np.isfinite(m.w_dec).all():
            raise ValueError(f"{m.name}: the decoder holds NaN or inf; the SAE is damaged.")
    d_ins = {m.name: m.d_in for m in members}
    if len(set(d_ins.values())) > 1:
        raise ValueError("The SAEs differ in d_in (" + ", ".join(f"{n}: {d}" for n, d in
                         d_ins.items()) + "): their decoder directions live in different "
                         "spaces. Pick SAEs trained on the same model and hook.")
    hooks = {m.name: m.hook for m in members if m.hook}
    if len(set(hooks.values())) > 1:
        raise ValueError("The SAEs read different hooks (" + ", ".join(f"{n}: {h}" for n, h in
                         hooks.items()) + "); a map compares directions at one hook. Pick "
                         "SAEs on the same hook.")
    return sorted(members, key=lambda m: (m.d_sae, m.name))


def family_key(members: list[Member]) -> str:
    """Hash of each member's name and decoder weights."""
    h = hashlib.sha1()
    for m in members:
        h.update(f"{m.name}|{m.d_sae}|{m.d_in}|".encode())
        h.update(hashlib.blake2b(np.ascontiguousarray(m.w_dec, dtype=np.float32).data,
                                 digest_size=16).digest())
    return h.hexdigest()[:16]


def _token_strings(tokenizer, ids: list[list[int]]) -> list[str]:
    return [token_text(tokenizer, row, N_TOKENS) for row in ids]


def embedded_family(widths: list[str] | None = None, tokenizer=None,
                    hover: bool = True) -> dict[str, Member]:
    """The shipped SAEs from their weight files (no model needed); with ``hover``, firing rates
    and logit-lens tokens from the shipped index (token ids shown when ``tokenizer`` is None)."""
    from safetensors.numpy import load_file

    shipped = embedded_saes()
    widths = shipped if widths is None else list(widths)
    unknown = [w for w in widths if w not in shipped]
    if unknown:
        raise ValueError(f"No embedded SAE named {', '.join(map(repr, unknown))}; data/saes "
                         f"holds {', '.join(shipped) or 'nothing'}.")
    if not widths:
        raise ValueError("Pick at least one width of the embedded family.")
    hover = _index_hover(EMBEDDED_INDEX, widths, tokenizer) if hover else {}
    family = {}
    for w in widths:
        cfg = json.loads((EMBEDDED_SAE_DIR / w / "cfg.json").read_text())
        w_dec = load_file(str(EMBEDDED_SAE_DIR / w / "sae_weights.safetensors"))["W_dec"]
        tokens, rates = hover.get(w, (None, None))
        family[w] = Member(w, w_dec.astype(np.float32), cfg["metadata"]["hook_name"],
                           f"embedded:{w}", tokens, rates)
    return family


def _index_hover(path: Path, names: list[str], tokenizer) -> dict:
    """{name: (top tokens, firing rates)} for the names an index file holds."""
    from core.feature_index import FeatureIndex

    if not Path(path).exists():
        return {}
    try:
        index = FeatureIndex(path)
    except ValueError as exc:
        log.warning("No hover data from %s: %s", path, exc)
        return {}
    try:
        out = {}
        for name in names:
            if name not in index.saes:
                continue
            rows = index.summary(name)
            out[name] = (_token_strings(tokenizer, rows["logit_pos_ids"]),
                         rows["firing_rate"].to_numpy(np.float32))
        return out
    finally:
        index.close()


def _width(token: str) -> float:
    number, unit = re.match(r"(\d+)([km]?)", token).groups()
    return int(number) * {"": 1, "k": 1_000, "m": 1_000_000}[unit]


def release_siblings(release: str, sae_id: str) -> list[str]:
    """The sae_ids of ``release`` that differ from ``sae_id`` only in width, narrowest first
    (``blocks.8.hook_resid_pre_768`` → ``…_1536``, …; ``layer_12/width_16k/canonical`` →
    ``layer_12/width_65k/canonical``, …): the release's family at that site."""
    from core.saes import release_sae_ids

    ids = release_sae_ids(release)
    if sae_id not in ids:
        raise ValueError(f"Release {release!r} has no sae_id {sae_id!r}.")
    for width in (r"(?<=width_)\d+[km]?", r"(?<=_)\d+$"):
        parts = re.split(width, sae_id)
        if len(parts) == 2:
            pattern = re.compile(re.escape(parts[0]) + r"(\d+[km]?)" + re.escape(parts[1]) + "$")
            found = {m.group(1): i for i in ids if (m := pattern.match(i))}
            return [found[w] for w in sorted(found, key=_width)]
    return [sae_id]


def member_from_sae(name: str, s: LoadedSAE, lm: LoadedModel | None = None) -> Member:
    """A loaded SAE as a member; hover data from its feature index if one exists, else logit-lens
    tokens from the weights when ``lm`` is given."""
    member = _member(name, s)
    if lm is None:
        return member
    from core.index import weight_tables
    from core.feature_index import index_location

    path, index_name = index_location(lm, s)
    hover = _index_hover(path, [index_name], lm.tokenizer).get(index_name)
    if hover is not None:
        member.top_tokens, member.firing_rate = hover
    else:
        ids = weight_tables(lm, s, N_TOKENS, 1)["logit_pos_ids"]
        member.top_tokens = _token_strings(lm.tokenizer, ids.tolist())
    return member


# --- computing --------------------------------------------------------------------------------


def _fast_bf16() -> bool:
    """bf16 matrix products are several times faster than fp32 only with AMX / AVX512-BF16."""
    try:
        return bool(torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported())
    except AttributeError:
        return False


def _knn(x: torch.Tensor, k: int, metric: str, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """Exact k nearest neighbours (self first), as UMAP's ``precomputed_knn`` wants them.

    For large cosine families on a CPU with fast bf16, candidates come from a bf16 product and
    are re-scored in fp32 (k + 16 candidates per row: bf16 errors are ~0.004 in cosine)."""
    n = len(x)
    if metric == "cosine":
        x = torch.nn.functional.normalize(x, dim=1)
    coarse = metric == "cosine" and n * x.shape[1] >= BF16_MIN_ELEMENTS and _fast_bf16()
    low = x.to(torch.bfloat16) if coarse else x
    idx, dist = [], []
    for start in range(0, n, chunk):
        rows = torch.arange(start, min(start + chunk, n))
        if metric == "cosine":
            score = (low[rows] @ low.T).float()
        else:
            score = -torch.cdist(x[rows], x)
        score[torch.arange(len(rows)), rows] = float("inf")  # self first, whatever duplicates
        if coarse:
            cand = score.topk(min(k + 16, n), dim=1).indices
            exact = torch.einsum("rd,rcd->rc", x[rows], x[cand])
            exact[cand == rows[:, None]] = float("inf")
            top = exact.topk(k, dim=1)
            top_idx = cand.gather(1, top.indices)
        else:
            top = score.topk(k, dim=1)
            top_idx = top.indices
        vals = top.values.clone()
        vals[:, 0] = 1.0 if metric == "cosine" else 0.0  # the self entry
        d = (1.0 - vals) if metric == "cosine" else -vals
        idx.append(top_idx)
        dist.append(d.clamp(min=0.0))
    return (torch.cat(idx).numpy().astype(np.int32), torch.cat(dist).numpy().astype(np.float32))


def _umap(x: np.ndarray, knn, n_components: int, min_dist: float, cfg: MapConfig) -> np.ndarray:
    import numba

    numba.config.CACHE_DIR = os.environ.get("NUMBA_CACHE_DIR") or str(cache_dir() / "numba")
    import umap

    with warnings.catch_warnings():  # n_jobs=1 because of random_state; no transform() wanted
        warnings.simplefilter("ignore")
        reducer = umap.UMAP(n_neighbors=cfg.n_neighbors, min_dist=min_dist,
                            n_components=n_components, metric=cfg.metric,
                            n_epochs=cfg.n_epochs, random_state=cfg.seed,
                            precomputed_knn=(knn[0], knn[1], None), low_memory=True)
        return reducer.fit_transform(x).astype(np.float32)


def lineage(members: list[Member], k: int, metric: str = "cosine") -> pd.DataFrame:
    """For each latent of each member, its ``k`` nearest latents by decoder cosine in the next
    wider member (members narrowest first)."""
    rows = []
    for narrow, wide in itertools.pairwise(members):
        a = torch.nn.functional.normalize(torch.from_numpy(narrow.w_dec).float(), dim=1)
        b = torch.nn.functional.normalize(torch.from_numpy(wide.w_dec).float(), dim=1)
        top = (a @ b.T).topk(min(k, wide.d_sae), dim=1)
        n, kk = top.indices.shape
        rows.append(pd.DataFrame({
            "sae": narrow.name, "latent": np.repeat(np.arange(n), kk),
            "child_sae": wide.name, "child_latent": top.indices.reshape(-1).numpy(),
            "cosine": top.values.reshape(-1).numpy(), "rank": np.tile(np.arange(kk), n),
        }))
    if not rows:
        return pd.DataFrame({"sae": pd.Series(dtype=str), "latent": pd.Series(dtype=int),
                             "child_sae": pd.Series(dtype=str),
                             "child_latent": pd.Series(dtype=int),
                             "cosine": pd.Series(dtype=float), "rank": pd.Series(dtype=int)})
    return pd.concat(rows, ignore_index=True)


def compute_map(family: Mapping[str, Member | LoadedSAE | np.ndarray], cfg: MapConfig = MapConfig(),
                progress: Progress | None = None) -> FeatureMap:
    """UMAP (and HDBSCAN clusters) of every decoder direction of ``family``, plus lineage."""
    progress = progress or log_progress
    start = time.perf_counter()
    members = check_family(family)
    total = sum(m.d_sae for m in members)
    if total <= cfg.n_neighbors:
        raise ValueError(f"The family has {total} latents; UMAP with n_neighbors="
                         f"{cfg.n_neighbors} needs more than {cfg.n_neighbors}. Add SAEs or "
                         f"lower n_neighbors below {total}.")
    if total > MAX_LATENTS:
        raise ValueError(f"The family has {total:,} latents; maps here handle up to "
                         f"{MAX_LATENTS:,} (the exact neighbour search grows with the square). "
                         "Leave out the widest SAEs.")
    if cfg.cluster and total <= cfg.cluster_dims + 1:
        raise ValueError(f"The family has {total} latents, too few for a {cfg.cluster_dims}-D "
                         "clustering embedding; lower cluster_dims or turn clustering off.")
    x = torch.from_numpy(np.concatenate([m.w_dec for m in members]).astype(np.float32))
    progress(0.02, f"Nearest neighbours of {total:,} decoder directions")
    knn = _knn(x, cfg.n_neighbors, cfg.metric)
    data = x.numpy()
    share = 0.45 if cfg.cluster else 0.85
    progress(0.05, f"2-D UMAP of {total:,} directions")
    xy = _umap(data, knn, 2, cfg.min_dist, cfg)
    cluster = np.full(total, -1, dtype=np.int32)
    if cfg.cluster:
        progress(0.05 + share, f"{cfg.cluster_dims}-D UMAP for clustering")
        emb = _umap(data, knn, cfg.cluster_dims, cfg.cluster_min_dist, cfg)
        progress(0.93, "HDBSCAN clustering")
        import hdbscan

        cluster = hdbscan.HDBSCAN(min_cluster_size=cfg.min_cluster_size).fit_predict(emb)
        cluster = cluster.astype(np.int32)
    progress(0.96, "Lineage between widths")
    lin = lineage(members, cfg.lineage_k, cfg.metric)
    points = pd.DataFrame({
        "sae": np.concatenate([[m.name] * m.d_sae for m in members]),
        "width": np.concatenate([np.full(m.d_sae, m.d_sae) for m in members]),
        "latent": np.concatenate([np.arange(m.d_sae) for m in members]),
        "x": xy[:, 0], "y": xy[:, 1], "cluster": cluster,
        "top_tokens": np.concatenate([m.top_tokens or [""] * m.d_sae for m in members]),
        "firing_rate": np.concatenate([np.full(m.d_sae, np.nan, np.float32)
                                       if m.firing_rate is None else m.firing_rate
                                       for m in members]).astype(np.float32),
        "label": np.concatenate([m.labels or [""] * m.d_sae for m in members]),
    })
    info = [{"name": m.name, "d_sae": m.d_sae, "d_in": m.d_in, "hook": m.hook, "spec": m.spec}
            for m in members]
    seconds = time.perf_counter() - start
    progress(1.0, f"Map of {total:,} latents in {seconds:.1f} s")
    return FeatureMap(family_key(members), cfg, info, points, lin, seconds)


# --- views of a map ---------------------------------------------------------------------------


def lineage_tree(fm: FeatureMap, sae: str, latent: int, min_cosine: float = 0.0,
                 k: int | None = None) -> pd.DataFrame:
    """The latent's descendants through every wider SAE: rows (depth, parent_sae, parent_latent,
    sae, latent, cosine) for children with decoder cosine ≥ ``min_cosine``, top ``k`` each."""
    names = [m["name"] for m in fm.members]
    if sae not in names:
        raise ValueError(f"The map has no SAE {sae!r}; it holds {', '.join(names)}.")
    d_sae = next(m["d_sae"] for m in fm.members if m["name"] == sae)
    if not 0 <= latent < d_sae:
        raise ValueError(f"Latent {latent} is out of range: {sae} has latents 0 to {d_sae - 1}.")
    lin = fm.lineage
    keep = lin["cosine"].to_numpy() >= min_cosine
    if k is not None:
        keep &= lin["rank"].to_numpy() < k
    lin = lin[keep]
    saes, lats = lin["sae"].to_numpy(), lin["latent"].to_numpy()
    rows, frontier = [], [(sae, latent)]
    for depth in range(1, len(names)):
        nxt = []
        for parent in frontier:
            grp = lin[(saes == parent[0]) & (lats == parent[1])].sort_values("rank")
            for r in grp.itertuples():
                rows.append((depth, parent[0], parent[1], r.child_sae, int(r.child_latent),
                             float(r.cosine)))
                nxt.append((r.child_sae, int(r.child_latent)))
        frontier = list(dict.fromkeys(nxt))
    return pd.DataFrame(rows, columns=["depth", "parent_sae", "parent_latent", "sae", "latent",
                                       "cosine"])


def parents(fm: FeatureMap, sae: str, latent: int) -> pd.DataFrame:
    """Narrower latents that list this latent among their nearest (its possible ancestors)."""
    lin = fm.lineage
    hit = lin[(lin["child_sae"] == sae) & (lin["child_latent"] == latent)]
    return hit[["sae", "latent", "cosine", "rank"]].sort_values("cosine", ascending=False)


def attach_labels(points: pd.DataFrame, labels: Mapping[str, Mapping[int, str]]) -> pd.DataFrame:
    """``points`` with the ``label`` column filled from {sae: {latent: label}} (labels change
    after a map is stored, so they are joined when it is shown)."""
    out = points.copy()
    for sae, by_latent in labels.items():
        mask = (out["sae"] == sae).to_numpy()
        if by_latent and mask.any():
            found = out.loc[mask, "latent"].map(by_latent)
            out.loc[mask, "label"] = found.fillna(out.loc[mask, "label"]).to_numpy()
    return out


def cluster_table(fm: FeatureMap, n_tokens: int = 8) -> pd.DataFrame:
    """One row per HDBSCAN cluster: size, latents per width, the most common top tokens."""
    pts = fm.points[fm.points["cluster"] >= 0]
    order = [m["name"] for m in fm.members]
    rows = []
    for c, grp in pts.groupby("cluster"):
        counts = grp["sae"].value_counts()
        tokens = pd.Series([t for s in grp["top_tokens"] if s for t in s.split(" · ")])
        common = tokens.value_counts().head(n_tokens)
        rows.append({
            "cluster": int(c), "size": len(grp), "n_widths": len(counts),
            "widths": ", ".join(f"{n}×{counts[n]}" for n in order if n in counts),
            "common_tokens": " · ".join(f"{t} ({n})" if n > 1 else t for t, n in common.items()),
            "mean_firing_rate": float(grp["firing_rate"].mean()),
        })
    cols = ["cluster", "size", "n_widths", "widths", "common_tokens", "mean_firing_rate"]
    out = pd.DataFrame(rows, columns=cols)
    return out.sort_values(["n_widths", "size"], ascending=False, ignore_index=True)
