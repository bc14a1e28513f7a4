"""What the server holds: a bounded set of loaded models, each with its SAEs, shared by every
browser session, and the rule for what a link may load.

* At most ``SAE_WORKBENCH_MAX_MODELS`` models (default 2) are held at once; loading another drops
  the one used least recently (with its SAEs). Models are keyed by source, name and the device and
  dtype they resolve to, so ``?dtype=auto`` and ``?dtype=float32`` on a CPU are one model.
* A link may preselect any model or SAE, but it loads only what is held already, the operator's
  default model, or a shipped (embedded) SAE; anything else waits for the user's Load click.
* ``local:`` paths in links are refused unless they lie under a directory listed in
  ``SAE_WORKBENCH_ALLOWED_DIRS`` (``os.pathsep``-separated). The check runs before the path is
  touched, so the refusal says nothing about what exists there.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

from core.models import LoadedModel, ModelSpec, load_model, resolve_device
from core.saes import LoadedSAE, SaeSpec, load_sae

DEFAULT_MAX_MODELS = 2
MAX_SAES_PER_MODEL = 8


def max_models() -> int:
    """``SAE_WORKBENCH_MAX_MODELS`` (at least 1), else 2."""
    raw = os.environ.get("SAE_WORKBENCH_MAX_MODELS", "")
    try:
        return max(1, int(raw)) if raw.strip() else DEFAULT_MAX_MODELS
    except ValueError:
        raise ValueError(f"SAE_WORKBENCH_MAX_MODELS={raw!r}; set it to a whole number such as "
                         "2.") from None


def allowed_dirs() -> list[Path]:
    """Directories whose contents links may name as ``local:`` models or SAEs."""
    raw = os.environ.get("SAE_WORKBENCH_ALLOWED_DIRS", "")
    return [Path(p).expanduser().resolve() for p in raw.split(os.pathsep) if p.strip()]


def check_link_path(path: str, what: str) -> None:
    """Refuse a ``local:`` path from a link unless it lies under an allowed directory."""
    allowed = allowed_dirs()
    resolved = Path(path).expanduser().resolve()
    if any(resolved == d or d in resolved.parents for d in allowed):
        return
    where = (f"under {', '.join(map(str, allowed))}" if allowed
             else "under a directory the server's operator lists in SAE_WORKBENCH_ALLOWED_DIRS "
                  "(none is listed)")
    raise ValueError(f"{what}=local:{path} is refused: local paths in links must lie {where}. "
                     "Type the path in the sidebar instead.")


def model_key(spec: ModelSpec) -> tuple[str, str, str, str]:
    """(source, name, device, dtype) with ``auto`` resolved, so equal models share one key."""
    try:
        device, dtype = resolve_device(spec.device, spec.dtype)
    except ValueError:  # no CUDA here: the key stays unresolved and loading reports why
        return spec.source, spec.name, spec.device, spec.dtype
    return spec.source, spec.name, device.type, str(dtype).removeprefix("torch.")


def sae_key(spec: SaeSpec) -> tuple[str, str, str]:
    name = str(Path(spec.name).expanduser().resolve()) if spec.source == "local" else spec.name
    return spec.source, name, spec.sae_id


class _Held:
    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self.saes: OrderedDict[tuple, LoadedSAE] = OrderedDict()


class ModelPool:
    """Loaded models and their SAEs, at most ``limit`` models (least recently used dropped)."""

    def __init__(self, limit: int | None = None,
                 loader: Callable[[ModelSpec], LoadedModel] = load_model,
                 sae_loader: Callable[[SaeSpec, LoadedModel], LoadedSAE] = load_sae):
        self.limit = limit
        self._load, self._load_sae = loader, sae_loader
        self._held: OrderedDict[tuple, _Held] = OrderedDict()
        self._lock = threading.RLock()
        self._loading: dict[tuple, threading.Lock] = {}

    @property
    def capacity(self) -> int:
        return self.limit if self.limit is not None else max_models()

    def holds(self, spec: ModelSpec) -> bool:
        with self._lock:
            return model_key(spec) in self._held

    def holds_sae(self, model: ModelSpec, sae: SaeSpec) -> bool:
        with self._lock:
            held = self._held.get(model_key(model))
            return held is not None and sae_key(sae) in held.saes

    def held(self) -> list[LoadedModel]:
        """The models held now, most recently used first."""
        with self._lock:
            return [h.lm for h in reversed(self._held.values())]

    def get(self, spec: ModelSpec) -> LoadedModel | None:
        """The model if it is held (marked as used), else ``None``; never loads."""
        with self._lock:
            held = self._held.get(model_key(spec))
            if held is None:
                return None
            self._held.move_to_end(model_key(spec))
            return held.lm

    def get_sae(self, lm: LoadedModel, spec: SaeSpec) -> LoadedSAE | None:
        with self._lock:
            held = self._held.get(model_key(lm.spec))
            return None if held is None else held.saes.get(sae_key(spec))

    def model(self, spec: ModelSpec) -> LoadedModel:
        """The model, loaded once (one load per key at a time; other keys load in parallel);
        the least recently used models are dropped to stay within the capacity."""
        key = model_key(spec)
        with self._lock:
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:
            found = self.get(spec)
            if found is not None:
                return found
            lm = self._load(spec)
            with self._lock:
                self._held[key] = _Held(lm)
                while len(self._held) > self.capacity:
                    self._held.popitem(last=False)
            return lm

    def sae(self, lm: LoadedModel, spec: SaeSpec) -> LoadedSAE:
        """The SAE on ``lm``, loaded once; at most 8 per model (least recently used dropped)."""
        with self._lock:
            held = self._held.get(model_key(lm.spec))
            found = None if held is None else held.saes.get(sae_key(spec))
            if found is not None:
                held.saes.move_to_end(sae_key(spec))
                return found
        loaded = self._load_sae(spec, lm)
        with self._lock:
            held = self._held.get(model_key(lm.spec))
            if held is not None and held.lm is lm:
                held.saes[sae_key(spec)] = loaded
                while len(held.saes) > MAX_SAES_PER_MODEL:
                    held.saes.popitem(last=False)
        return loaded

    def clear(self) -> None:
        with self._lock:
            self._held.clear()


def link_may_load_model(pool: ModelPool, spec: ModelSpec, default: ModelSpec) -> bool:
    """Whether a model a link names loads without a click: it is held, or it is the default."""
    return pool.holds(spec) or model_key(spec) == model_key(default)


def link_may_load_sae(pool: ModelPool, model: ModelSpec, spec: SaeSpec | None,
                      default: SaeSpec | None) -> bool:
    """Whether an SAE a link names loads without a click: none, held on the model, shipped
    with the workbench (``embedded``), or the operator's default."""
    return (spec is None or spec.source == "embedded" or pool.holds_sae(model, spec)
            or (default is not None and sae_key(spec) == sae_key(default)))
