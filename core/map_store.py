"""Stored feature maps: one DuckDB file per place, keyed by family and parameters.

The default map of the embedded family ships inside ``data/index/embedded.duckdb`` (written by
``python -m core.map_store``); any other (family, parameters) goes into ``maps.duckdb`` in the cache
directory, in one transaction, so a killed computation never leaves half a map.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from core.feature_index import EMBEDDED_INDEX
from core.maps import (
    FeatureMap,
    MapConfig,
    Member,
    compute_map,
    embedded_family,
    family_key,
)
from core.models import cache_dir, embedded_ready, embedded_tokenizer, tqdm_progress

log = logging.getLogger(__name__)

_TABLES = {
    "maps": "map_id VARCHAR PRIMARY KEY, family_key VARCHAR, params_key VARCHAR, "
            "members VARCHAR, config VARCHAR, seconds DOUBLE, created DOUBLE",
    "map_points": "map_id VARCHAR, sae VARCHAR, width INTEGER, latent INTEGER, x REAL, y REAL, "
                  "cluster INTEGER, top_tokens VARCHAR, firing_rate REAL, label VARCHAR",
    "map_lineage": "map_id VARCHAR, sae VARCHAR, latent INTEGER, child_sae VARCHAR, "
                   "child_latent INTEGER, cosine REAL, rank SMALLINT",
}
_write_lock = threading.Lock()


def cache_map_path() -> Path:
    return cache_dir() / "index" / "maps.duckdb"


def save_map(fm: FeatureMap, path: Path | None = None) -> Path:
    """Write ``fm`` into ``path`` (default: the cache file) in one transaction, replacing a map
    with the same family and parameters."""
    import duckdb

    path = Path(path or cache_map_path())
    path.parent.mkdir(parents=True, exist_ok=True)
    mid = fm.map_id
    points = fm.points.assign(map_id=mid)[["map_id", "sae", "width", "latent", "x", "y",
                                           "cluster", "top_tokens", "firing_rate", "label"]]
    lin = fm.lineage.assign(map_id=mid)[["map_id", "sae", "latent", "child_sae",
                                         "child_latent", "cosine", "rank"]]
    head = pd.DataFrame([{
        "map_id": mid, "family_key": fm.family_key, "params_key": fm.config.key,
        "members": json.dumps(fm.members), "config": json.dumps(asdict(fm.config)),
        "seconds": fm.seconds, "created": time.time(),
    }])
    with _write_lock:
        try:
            con = duckdb.connect(str(path))
        except duckdb.Error as exc:
            raise ValueError(f"Cannot write the map into {path} ({exc}); another process may "
                             "hold it: close it and compute again.") from exc
        try:
            con.execute("BEGIN TRANSACTION")
            for table, schema in _TABLES.items():
                con.execute(f"CREATE TABLE IF NOT EXISTS {table} ({schema})")
                con.execute(f"DELETE FROM {table} WHERE map_id = ?", [mid])
            for table, frame in (("maps", head), ("map_points", points), ("map_lineage", lin)):
                con.register("frame", frame)
                con.execute(f"INSERT INTO {table} SELECT * FROM frame")
                con.unregister("frame")
            con.execute("COMMIT")
            con.execute("CHECKPOINT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        finally:
            con.close()
    log.info("Map %s (%d points) saved to %s", mid, len(points), path)
    return path


def map_files() -> list[Path]:
    """Where maps are looked up, in order: the shipped index, then the cache."""
    return [EMBEDDED_INDEX, cache_map_path()]


def load_map(family: str | list[Member], cfg: MapConfig = MapConfig(),
             paths: list[Path] | None = None) -> FeatureMap | None:
    """The stored map of this family (key or members) and config, or None."""
    import duckdb

    key = family if isinstance(family, str) else family_key(family)
    mid = f"{key}-{cfg.key}"
    for path in paths or map_files():
        if not Path(path).exists():
            continue
        read_only = Path(path) == EMBEDDED_INDEX
        with _write_lock:
            try:
                con = duckdb.connect(str(path), read_only=read_only)
            except duckdb.Error as exc:
                log.warning("Cannot read maps from %s: %s", path, exc)
                continue
            try:
                tables = {r[0] for r in con.execute("SHOW TABLES").fetchall()}
                if not set(_TABLES) <= tables:
                    continue
                head = con.execute("SELECT members, seconds FROM maps WHERE map_id = ?",
                                   [mid]).fetchone()
                if head is None:
                    continue
                points = con.execute(
                    "SELECT sae, width, latent, x, y, cluster, top_tokens, firing_rate, label "
                    "FROM map_points WHERE map_id = ? ORDER BY width, sae, latent", [mid]).df()
                lin = con.execute(
                    "SELECT sae, latent, child_sae, child_latent, cosine, rank FROM map_lineage"
                    " WHERE map_id = ? ORDER BY sae, latent, rank", [mid]).df()
            finally:
                con.close()
        return FeatureMap(key, cfg, json.loads(head[0]), points, lin, float(head[1]),
                          source=str(path))
    return None


def main(argv: list[str] | None = None) -> None:
    defaults = MapConfig()
    parser = argparse.ArgumentParser(description="Compute the feature map of the embedded SAE "
                                     "family and store it in a DuckDB file.")
    parser.add_argument("--widths", nargs="+", default=None, help="embedded SAEs (default all)")
    parser.add_argument("--out", type=Path, default=EMBEDDED_INDEX,
                        help="DuckDB file to write into (default: the shipped index)")
    parser.add_argument("--n-neighbors", type=int, default=defaults.n_neighbors)
    parser.add_argument("--min-dist", type=float, default=defaults.min_dist)
    parser.add_argument("--no-cluster", action="store_true")
    parser.add_argument("--min-cluster-size", type=int, default=defaults.min_cluster_size)
    parser.add_argument("--lineage-k", type=int, default=defaults.lineage_k)
    parser.add_argument("--n-epochs", type=int, default=defaults.n_epochs,
                        help="0: UMAP's rule (500 below 10,000 points, 200 above)")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    log.setLevel(logging.INFO)
    cfg = MapConfig(n_neighbors=args.n_neighbors, min_dist=args.min_dist,
                    cluster=not args.no_cluster, min_cluster_size=args.min_cluster_size,
                    lineage_k=args.lineage_k, n_epochs=args.n_epochs or None, seed=args.seed)
    tokenizer = embedded_tokenizer() if embedded_ready() else None
    family = embedded_family(args.widths, tokenizer)
    with tqdm_progress() as progress:
        fm = compute_map(family, cfg, progress)
    out = Path(args.out)
    if out.exists():
        # Write a copy and move it into place: apps reading the file keep their open copy
        # (DuckDB would refuse a writer while any other process reads it).
        tmp = out.with_name(out.name + ".partial")
        shutil.copyfile(out, tmp)
        try:
            save_map(fm, tmp)
            os.replace(tmp, out)
        finally:
            tmp.unlink(missing_ok=True)
    else:
        save_map(fm, out)
    log.info("Map %s: %d points, %d clusters, %.1f s, written to %s", fm.map_id, len(fm.points),
             int(fm.points["cluster"].max() + 1), fm.seconds, args.out)


if __name__ == "__main__":
    main()
