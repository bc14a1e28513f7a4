"""Cold and warm load time of the embedded default, each in a fresh process, imports included.

cold: empty cache directory (assemble the GGUF, de-quantize, save safetensors, load);
warm: the converted copy exists (what every start after the first pays). The figure is what a
user waits for: from starting the interpreter (torch, transformers and the workbench imported)
to the model ready; the time inside ``load_model`` is reported beside it. Goal: warm <= 5 s.

    python benchmarks/load_time.py [--warm-runs 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import save  # noqa: E402

CHILD = (
    "import sys, time; sys.path.insert(0, {root!r}); t = time.perf_counter();"
    "from core.models import ModelSpec, load_model; lm = load_model(ModelSpec('embedded'));"
    "print('SECONDS', time.perf_counter() - t, lm.load_seconds, flush=True)"
)


def timed_load(cache: str) -> tuple[float, float]:
    """(seconds from starting a new interpreter to the model ready, imports included; seconds
    inside load_model)."""
    env = {**os.environ, "SAE_WORKBENCH_CACHE": cache, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", CHILD.format(root=str(ROOT))], env=env,
                            stdout=subprocess.PIPE, text=True)
    line = next(l for l in proc.stdout if l.startswith("SECONDS"))  # noqa: E741
    ready = time.perf_counter() - start
    proc.wait()
    if proc.returncode:
        raise SystemExit(f"the child failed ({proc.returncode})")
    inside = float(line.split()[2])
    return ready, inside


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--warm-runs", type=int, default=3)
    parser.add_argument("--warm-only", action="store_true",
                        help="skip the cold load; time warm loads from the existing cache "
                        "directory (SAE_WORKBENCH_CACHE or ~/.cache/sae-workbench)")
    args = parser.parse_args()
    start = time.perf_counter()
    result: dict = {}
    if args.warm_only:
        from core.models import cache_dir

        warm = [timed_load(str(cache_dir())) for _ in range(args.warm_runs)]
    else:
        with tempfile.TemporaryDirectory() as cache:
            cold = timed_load(cache)
            warm = [timed_load(cache) for _ in range(args.warm_runs)]
        result = {"cold_s": round(cold[0], 2), "cold_inside_load_model_s": round(cold[1], 2)}
    median = sorted(w[0] for w in warm)[len(warm) // 2]
    result |= {
        "warm_s": [round(w[0], 2) for w in warm],
        "warm_inside_load_model_s": [round(w[1], 2) for w in warm],
        "warm_median_s": round(median, 2),
        "warm_goal_s": 5.0,
        "warm_meets_goal": median <= 5.0,
        "wall_s": round(time.perf_counter() - start, 1),
    }
    save("load_time", result, device="cpu")


if __name__ == "__main__":
    main()
