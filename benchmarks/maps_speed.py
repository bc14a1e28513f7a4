"""Feature-map speed: 2-D + 10-D UMAP + HDBSCAN (+ lineage) for the embedded family and for 16k
random unit directions, and the cached view. Each run is a fresh process.

cold: an empty numba cache (UMAP's and pynndescent's cached functions compile first);
warm: the numba cache filled by the cold run (what every start after the first pays).
Goals on the 2-core CPU: embedded family (7,680 latents) <= 30 s, 16k latents <= 60 s, cached
view <= 1 s.

    python benchmarks/maps_speed.py [--dim 2304] [--skip-cold]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import save  # noqa: E402


def child(mode: str, dim: int, store: str) -> dict:
    """One measurement, inside the child process."""
    start = time.perf_counter()
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from core.maps import (
        MapConfig,
        check_family,
        compute_map,
        embedded_family,
    )
    from core.map_store import load_map, save_map

    imported = time.perf_counter() - start
    marks: list[tuple[float, str]] = []

    def progress(fraction: float, message: str) -> None:
        marks.append((time.perf_counter(), message.split(" of ")[0].split(" for ")[0]))

    def phases() -> dict:
        return {name: round(b - a, 2) for (a, name), (b, _) in itertools.pairwise(marks)}

    if mode == "embedded":
        family = embedded_family(hover=False)
        t = time.perf_counter()
        fm = compute_map(family, MapConfig(), progress)
        save_map(fm, Path(store))
        return {"latents": len(fm.points), "seconds": round(time.perf_counter() - t, 2),
                "with_imports": round(time.perf_counter() - start, 2),
                "imports": round(imported, 2), "phases": phases(),
                "clusters": int(fm.points["cluster"].max() + 1)}
    if mode == "random16k":
        g = np.random.default_rng(0)
        widths = (1024, 2048, 4096, 8192)  # 15,360 + 1,024 = 16,384 latents, like one 16k SAE
        family = {}
        for n in (1024,) + widths:
            w = g.standard_normal((n, dim)).astype(np.float32)
            family[f"r{len(family)}-{n}"] = w / np.linalg.norm(w, axis=1, keepdims=True)
        t = time.perf_counter()
        fm = compute_map(family, MapConfig(), progress)
        return {"latents": len(fm.points), "d_in": dim,
                "seconds": round(time.perf_counter() - t, 2),
                "with_imports": round(time.perf_counter() - start, 2), "phases": phases(),
                "clusters": int(fm.points["cluster"].max() + 1)}
    # cached: what the page pays on a second view (read weights, hash, load the map, figure)
    from ui.maps_view import map_figure

    out = {}
    for where, paths in (("cache_file", [Path(store)]), ("shipped_index", None)):
        t = time.perf_counter()
        members = check_family(embedded_family(hover=False))
        fm = load_map(members, MapConfig(), paths)
        if fm is None:
            out[where] = "no stored map"
            continue
        loaded = time.perf_counter() - t
        map_figure(fm.points, "width")
        out[where] = {"latents": len(fm.points), "load_seconds": round(loaded, 3),
                      "with_figure": round(time.perf_counter() - t, 3)}
    return out


def run(mode: str, dim: int, store: str, numba_dir: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": numba_dir, "HF_HUB_OFFLINE": "1"}
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); "
            f"from benchmarks.maps_speed import child; "
            f"print('RESULT', json.dumps(child({mode!r}, {dim}, {store!r})))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    return json.loads(next(x for x in out.splitlines() if x.startswith("RESULT"))[7:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dim", type=int, default=2304,
                        help="d_in of the random family (2304: gemma-2-2b, 768: gpt2)")
    parser.add_argument("--skip-cold", action="store_true",
                        help="reuse $NUMBA_CACHE_DIR instead of an empty numba cache")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        numba_dir = os.environ.get("NUMBA_CACHE_DIR", "") if args.skip_cold else ""
        numba_dir = numba_dir or str(Path(tmp) / "numba")
        store = str(Path(tmp) / "maps.duckdb")
        result = {"cpu_count": os.cpu_count()}
        if not args.skip_cold:
            result["embedded_cold"] = run("embedded", args.dim, store, numba_dir)
        result["embedded_warm"] = run("embedded", args.dim, store, numba_dir)
        result["random16k_warm"] = run("random16k", args.dim, store, numba_dir)
        result["cached_view"] = run("cached", args.dim, store, numba_dir)
    save("maps_speed", result, device="cpu")


if __name__ == "__main__":
    main()
