"""Write a benchmark run's JSON to ``benchmarks/results/``: the figures plus the machine, the
device and the library versions they were taken with; and the options every benchmark takes."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine(device: torch.device | str) -> dict:
    """Where a figure was taken: CPU model and cores, GPU name, library versions, git commit."""
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    device = torch.device(device)
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "device": str(device), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                        capture_output=True, text=True, check=True,
                                        cwd=RESULTS.parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info


def write(name: str, result: dict, device: torch.device | str) -> Path:
    """``results/<name>-<device>-<UTC time>.json`` holding ``result`` and :func:`machine`."""
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = RESULTS / f"{name}-{torch.device(device).type}-{stamp}.json"
    path.write_text(json.dumps({"benchmark": name, "when": stamp,
                                "machine": machine(device), **result}, indent=1) + "\n")
    return path


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
        torch.set_num_threads(args.threads)
    return args
