"""The Lookup page from click to rendered: the embedded model, the w4096 SAE, 20 alive latents.

Drives the real app with Streamlit's AppTest (the router, the sidebar and the page, as a browser
session runs them): for each latent, set it in the page's latent box and time the rerun until
every element of the page (metrics, plots, logit lens, the top contexts and the interval samples
with their coloured tokens) is produced. Median and worst over the latents. Goal: median <= 1 s
on the CPU.

The same latents are also timed (``--recompute N``, first N) on a copy of the index without the
stored activations (schema 1), where the page re-runs every shown window through the model as it
did before they were stored: the reference the stored spans replace.

    python benchmarks/lookup_page.py [--index data/index/embedded.duckdb] [--latents 20]
"""

from __future__ import annotations

import argparse
import logging
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import save  # noqa: E402


def as_version_1(src: Path, dst: Path) -> None:
    """A copy of the index without the stored span activations (what schema 1 held)."""
    import duckdb

    dst.write_bytes(src.read_bytes())
    con = duckdb.connect(str(dst))
    con.execute("UPDATE meta SET value = '1' WHERE key = 'schema_version'")
    con.execute("DROP TABLE shown_spans")
    con.execute("CHECKPOINT")
    con.close()


def time_latents(index_path: Path, latents: list[int], sae: str) -> dict:
    """Open the Lookup page on ``index_path`` and time each latent from setting it to rendered."""
    from streamlit.testing.v1 import AppTest

    import core.feature_index

    core.feature_index.EMBEDDED_INDEX = index_path  # where the page looks for the embedded index
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=900)
    at.query_params.update(model="embedded", sae=f"embedded:{sae}")
    start = time.perf_counter()
    at.run()
    first_app = time.perf_counter() - start
    at.switch_page("views/lookup.py")
    start = time.perf_counter()
    at.run()
    first_page = time.perf_counter() - start
    if at.exception:
        raise SystemExit(f"the page failed: {at.exception}")
    times, examples = [], []
    for latent in latents:
        at.number_input(key="lookup_latent").set_value(latent)
        start = time.perf_counter()
        at.run()
        times.append(time.perf_counter() - start)
        print(f"latent {latent}: {times[-1]:.3f} s", file=sys.stderr, flush=True)
        if at.exception:
            raise SystemExit(f"latent {latent}: {at.exception}")
        html = " ".join(m.value for m in at.markdown)
        examples.append(html.count('class="example"'))
        assert at.number_input(key="lookup_latent").value == latent
    return {
        "latents": latents, "seconds": [round(t, 3) for t in times],
        "median_s": round(statistics.median(times), 3), "worst_s": round(max(times), 3),
        "examples_rendered": examples, "app_first_run_s": round(first_app, 2),
        "page_first_run_s": round(first_page, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--index", type=Path, default=ROOT / "data" / "index" / "embedded.duckdb")
    parser.add_argument("--sae", default="w4096")
    parser.add_argument("--latents", type=int, default=20)
    parser.add_argument("--recompute", type=int, default=5,
                        help="also time the first N latents re-running the windows (0: skip)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from core.feature_index import FeatureIndex

    index = FeatureIndex(args.index)
    alive = index.alive_latents(args.sae, with_examples=True)
    version = index.version
    index.close()
    latents = sorted(random.Random(args.seed).sample(alive, min(args.latents, len(alive))))
    figures = {"index": str(args.index), "index_schema": version, "sae": args.sae,
               "alive_latents": len(alive), "goal_median_s": 1.0,
               "stored": time_latents(args.index.resolve(), latents, args.sae)}
    if args.recompute and version >= 2:
        with tempfile.TemporaryDirectory() as tmp:
            old = Path(tmp) / "embedded.duckdb"
            as_version_1(args.index, old)
            figures["recomputed"] = time_latents(old, latents[:args.recompute], args.sae)
    figures["meets_goal"] = figures["stored"]["median_s"] <= 1.0
    save("lookup_page", figures, device="cpu")


if __name__ == "__main__":
    main()
