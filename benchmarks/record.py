"""Every benchmark run's figures, with the machine they came from, kept in benchmarks/results/.

    from record import save
    save("index_speed", {"tokens": 16384, ...}, device="cpu")

writes ``benchmarks/results/index_speed-<UTC time>.json`` (machine, CPU, device, package versions,
git commit, the command line, then the figures) and prints it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
PACKAGES = ("torch", "transformers", "sae-lens", "duckdb", "streamlit", "numpy", "umap-learn",
            "hdbscan")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def _commit() -> str:
    """The commit checked out, with ``+changes`` when tracked code outside the results differs
    from it (``SAE_WORKBENCH_COMMIT`` names it for a copy of the tree without its git history,
    e.g. on a machine the tree was sent to)."""
    if os.environ.get("SAE_WORKBENCH_COMMIT"):
        return os.environ["SAE_WORKBENCH_COMMIT"]

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=RESULTS.parent.parent, capture_output=True,
                              text=True, check=True).stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = git("status", "--porcelain", "--untracked-files=no", "--", ".",
                      f":!{RESULTS.relative_to(RESULTS.parent.parent).as_posix()}")
    except (OSError, subprocess.CalledProcessError):
        return ""
    return head + ("+changes" if changed else "")


_STARTED_AT = _commit()
"""The code a run started from (a long run may outlast a commit)."""


def machine(device: str = "") -> dict:
    info = {"host": platform.node(), "cpu": _cpu_model(), "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "platform": platform.platform()}
    if device:
        info["device"] = device
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def save(name: str, figures: dict, device: str = "") -> Path:
    """Write one run's JSON to ``benchmarks/results/<name>-<UTC time>.json`` and print it."""
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    run = {"benchmark": name, "utc": stamp, "command": " ".join(sys.argv),
           "commit": _STARTED_AT, "machine": machine(device), "versions": _versions(),
           "figures": figures}
    path = RESULTS / f"{name}-{stamp}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(run, indent=2) + "\n")
    tmp.replace(path)
    print(json.dumps(run, indent=2))
    print(f"saved {path.relative_to(RESULTS.parent.parent)}", file=sys.stderr)
    return path


def dispatch_counter():
    """A ``TorchDispatchMode`` that counts the aten operations dispatched while it is active
    (``total``, and ``by_op`` by name): each a kernel launch on a GPU."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    class Dispatched(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.total = 0
            self.by_op: collections.Counter = collections.Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.total += 1
            self.by_op[str(func.overloadpacket)] += 1
            return func(*args, **(kwargs or {}))

    return Dispatched()


def arguments(doc: str) -> argparse.ArgumentParser:
    """A command line with what every benchmark takes: ``--device`` and ``--threads``."""
    parser = argparse.ArgumentParser(description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice)")
    return parser


def parse(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The arguments, with ``--threads`` applied."""
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args
