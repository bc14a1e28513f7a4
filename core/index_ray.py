"""The index build's streaming pass on a Ray cluster (Ray Data).

The token windows become a Ray Dataset of shards (``IndexConfig.shard_windows`` windows each).
``map_batches`` sends them to a pool of stateful workers, each of which loads the model and the
SAEs once (on a GPU of its own where the cluster has GPUs, else on CPUs) and turns a shard into
its :class:`~core.index_stats.ShardStats`, exactly as the single-machine build does. The driver
merges the shards in shard order as they arrive, so the index is the same as one machine's.
Ray restarts a worker that dies and runs its shard again; shards are pure functions of their
windows, so a retried shard gives the same statistics.

Ray is optional for the app: only a build asked to run on Ray imports it.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from core.index_stats import IndexConfig, Running, shard_stats
from core.models import LoadedModel, ModelSpec, Progress, load_model
from core.saes import LoadedSAE, SaeSpec, load_sae

log = logging.getLogger(__name__)

RAY_INSTALL = "pip install 'ray[data]>=2.60'"
RAY_ADDRESS_ENV = "SAE_WORKBENCH_RAY"
"""The cluster the Lookup page's build panel offers (``local``, ``auto`` or ``ray://host:port``)."""
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class RayConfig:
    """Where and on how many workers the streaming pass runs."""

    address: str = "local"
    """``local``: start Ray on this machine for the build and stop it afterwards; ``auto``: the
    cluster this machine is a node of; ``ray://host:10001``: a cluster's client port. When Ray
    is already initialized in this process, that instance is used and left running."""
    workers: int = 2
    """Stateful workers, each holding the model and the SAEs."""
    cpus_per_worker: int = 1
    """CPUs per worker (its torch threads when it runs on the CPU)."""
    gpus_per_worker: float | None = None
    """``None``: one GPU per worker when the cluster has GPUs, else CPU workers."""
    object_store_mb: int = 200
    """Object store of a Ray started here (``address="local"``)."""
    before_shard: Callable[[int], None] | None = None
    """Runs in the worker before each shard, given its number (tests kill a worker with it)."""

    def __post_init__(self) -> None:
        if not self.address.strip():
            raise ValueError("The Ray address is empty; use 'local', 'auto' or "
                             "'ray://<head>:10001'.")
        if not 1 <= self.workers <= 4096:
            raise ValueError(f"workers={self.workers}; use 1 to 4096 workers.")
        if self.cpus_per_worker < 1:
            raise ValueError(f"cpus_per_worker={self.cpus_per_worker}; use 1 or more.")
        if self.object_store_mb < 80:
            raise ValueError(f"object_store_mb={self.object_store_mb}; Ray needs at least 80.")


def configured_address() -> str | None:
    """The cluster the operator offers for builds from the app (``SAE_WORKBENCH_RAY``), if any."""
    return os.environ.get(RAY_ADDRESS_ENV, "").strip() or None


def import_ray():
    """``ray`` with Ray Data, or a message naming the install command."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ValueError("Building on Ray needs Ray, which the app does not install; install it "
                         f"with `{RAY_INSTALL}` (or build without --ray).") from None
    return ray


def init_local(num_cpus: int, object_store_mb: int = 200):
    """Start Ray on this machine, with the project's code importable by its workers."""
    ray = import_ray()
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             object_store_memory=object_store_mb * 2**20, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path}})
    return ray


def _connect(cfg: RayConfig) -> bool:
    """Initialize Ray for ``cfg`` unless it is running already; whether this call started it."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    if cfg.address == "local":
        init_local(cfg.workers * cfg.cpus_per_worker, cfg.object_store_mb)
    else:
        try:  # the cluster's nodes have the project's dependencies; ship its code
            ray.init(address=cfg.address, log_to_driver=False, configure_logging=False,
                     runtime_env={"py_modules": [str(ROOT / "core")]})
        except ConnectionError as exc:
            raise ValueError(f"No Ray cluster answers at {cfg.address!r} ({exc}); start one "
                             "with `ray start --head` or pass --ray local.") from None
    return True


class ShardWorker:
    """A Ray Data worker: loads the model and SAEs once, then turns shards into statistics."""

    def __init__(self, model: ModelSpec, saes: dict[str, SaeSpec], cfg: IndexConfig,
                 threads: int, before_shard: Callable[[int], None] | None = None) -> None:
        if model.device == "cpu":
            torch.set_num_threads(threads)
        self.lm = load_model(model)
        self.saes = {name: load_sae(spec, self.lm) for name, spec in saes.items()}
        self.cfg = cfg
        self.before_shard = before_shard

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = np.empty(len(batch["shard"]), dtype=object)
        for i, (shard, first, ids) in enumerate(zip(batch["shard"], batch["first"],
                                                     batch["ids"])):
            if self.before_shard is not None:
                self.before_shard(int(shard))
            out[i] = shard_stats(self.lm, self.saes, ids, int(first), int(shard), self.cfg)
        return {"shard": batch["shard"], "stats": out}


def _worker_specs(lm: LoadedModel, saes: dict[str, LoadedSAE], device: str
                  ) -> tuple[ModelSpec, dict[str, SaeSpec]]:
    """What the workers load: the driver's model and SAEs, by spec."""
    for name, s in saes.items():
        if s.spec.source == "local" and not Path(s.spec.name).exists():
            raise ValueError(f"SAE {name} was not loaded from a directory the workers can read "
                             f"({s.spec.name}); save it with sae.save_model(path) and load it "
                             "from there.")
    return replace(lm.spec, device=device), {name: s.spec for name, s in saes.items()}


def ray_stream(lm: LoadedModel, saes: dict[str, LoadedSAE], windows: list[list[int]],
               cfg: IndexConfig, ray_cfg: RayConfig, progress: Progress
               ) -> tuple[dict[str, Running], int]:
    """(running statistics per SAE, tokens counted) of ``windows``, computed on Ray."""
    ray = import_ray()
    started = _connect(ray_cfg)
    try:
        return _stream(ray, lm, saes, windows, cfg, ray_cfg, progress)
    finally:
        if started:
            ray.shutdown()


def _stream(ray, lm, saes, windows, cfg, ray_cfg, progress):
    from ray.data import ActorPoolStrategy, DataContext

    data_ctx = DataContext.get_current()
    data_ctx.enable_progress_bars = False  # the build reports its own, across workers
    data_ctx.print_on_execution_start = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    gpus = ray_cfg.gpus_per_worker
    if gpus is None:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    model, sae_specs = _worker_specs(lm, saes, "cuda" if gpus else "cpu")
    step = cfg.shard_windows
    shards = [{"shard": i, "first": w,
               "ids": np.asarray(windows[w:w + step], dtype=np.int32)}
              for i, w in enumerate(range(0, len(windows), step))]
    ds = ray.data.from_items(shards, override_num_blocks=len(shards))
    ds = ds.map_batches(
        ShardWorker, batch_size=1, batch_format="numpy",
        fn_constructor_kwargs={"model": model, "saes": sae_specs, "cfg": cfg,
                               "threads": ray_cfg.cpus_per_worker,
                               "before_shard": ray_cfg.before_shard},
        compute=ActorPoolStrategy(size=min(ray_cfg.workers, len(shards))),
        num_cpus=ray_cfg.cpus_per_worker, num_gpus=gpus or None)
    runs = {name: Running(s.d_sae, s.d_in, cfg.top_k, cfg.n_sample) for name, s in saes.items()}
    pending: dict[int, tuple] = {}
    n_tokens, done, merged, start = 0, 0, 0, time.perf_counter()
    where = f"{ray_cfg.workers} {'GPU' if gpus else 'CPU'} worker" + (
        "s" if ray_cfg.workers > 1 else "")
    progress(0.0, f"Starting {where} on Ray ({len(shards)} shards)")
    for row in _rows(ray, ds):
        pending[int(row["shard"])] = row["stats"]
        done += 1
        while merged in pending:  # in shard order, as one machine adds them
            parts, tokens = pending.pop(merged)
            for name, part in parts.items():
                runs[name].merge(part)
            n_tokens += tokens
            merged += 1
        rate = n_tokens / (time.perf_counter() - start)
        progress(done / len(shards), f"{done} of {len(shards)} shards done on {where}: "
                 f"{n_tokens:,} tokens merged ({rate:,.0f} tokens/s)")
    if pending:
        raise RuntimeError(f"Shards {sorted(pending)} arrived but earlier ones never did.")
    return runs, n_tokens


def _rows(ray, ds):
    """The dataset's rows; a failure in a worker (after Ray's retries) as a ValueError that
    says what went wrong there."""
    try:
        yield from ds.iter_rows()
    except ray.exceptions.RayError as exc:
        text = []
        cause: BaseException | None = exc
        while cause is not None:
            text.append(str(cause))
            cause = cause.__cause__
        # the worker's own error line ("FileNotFoundError: ..."), not Ray's wrappers around it
        found = re.findall(r"^(?!ray\.)(\w+(?:Error|Exception): .+)$", "\n".join(text), re.M)
        what = found[0] if found else repr(exc)
        raise ValueError(f"The build on Ray failed in a worker ({what}). Fix that and build "
                         "again; the previous index is unchanged.") from exc
