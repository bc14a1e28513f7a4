"""What "dead", "dense" and "alive" mean for a latent, in one place.

A latent is **dead** when it never fired on the tokens it was counted on, and **dense** when it
fired on more than one token in ten. A rate is only as fine as its sample: a latent that fires
once in 100k tokens is rare, not dead, so every figure is quoted with its token count, and the
shipped family's counts come from at least 2M tokens never trained on (``data/saes/README.md``).
The model card, Lookup's SAE health, the maps' "hide dead latents" and Dreaming's "random alive
latent" all use these definitions through the feature index.
"""

from __future__ import annotations

import math
from pathlib import Path

DENSE_RATE = 0.1
"""Firing rates above this (one token in ten) count as dense."""


def is_dead(fires):
    """Elementwise: never fired (``fires`` are firing counts: a tensor, array or number)."""
    return fires == 0


def is_dense(fires, tokens: int):
    return fires / tokens > DENSE_RATE


def describe(dead: int, dense: int, d_sae: int, tokens: int) -> str:
    """One line for pages and cards, e.g. "dead 3 (0.1%), dense 12 (0.3%) in 2,000,000 tokens"."""
    return (f"dead {dead:,} ({dead / d_sae:.1%}), dense {dense:,} ({dense / d_sae:.1%}), "
            f"counted on {tokens:,} tokens")


DEAD_LOG10 = -10.0
"""Where dead latents sit on log10 firing-rate scales."""


def log10_density(fires, tokens: int) -> list[float]:
    """log10 firing rate of every latent (dead ones at :data:`DEAD_LOG10`)."""
    return [DEAD_LOG10 if f == 0 else math.log10(f / tokens) for f in fires.tolist()]


def load_firing_counts(path: Path | str) -> tuple[dict, int]:
    """``({sae name: int64 counts}, tokens)`` from a family's ``firing_counts.safetensors``."""
    from safetensors import safe_open

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: it is written beside a family's card "
                                "by `python -m core.pipeline.report`.")
    with safe_open(str(path), "pt") as f:
        tokens = int(f.metadata()["tokens"])
        return {name: f.get_tensor(name) for name in f.keys()}, tokens
