"""Steering page helpers: the recipe in session state, slider ranges, plots and tables."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from core.labels import token_text
from core.feature_index import FeatureIndex
from core.models import EMBEDDED_MODEL_NAME, LoadedModel
from core.saes import LoadedSAE
from core.steering import Intervention, Recipe, Sweep

STARTER = Recipe((Intervention("clamp", 3500.0, latent=3963),), "all")
"""Offline starter: w4096 latent 3963 fires on 'small' / 'tiny' (its top logit-lens tokens)."""
STARTER_SAE = "w4096"
STARTER_PROMPT = "I went to the market and"
_uid = itertools.count()


def starter_for(lm: LoadedModel, sae: LoadedSAE | None) -> Recipe:
    if (sae is not None and lm.name == EMBEDDED_MODEL_NAME and sae.spec.source == "embedded"
            and sae.spec.name == STARTER_SAE):
        return STARTER
    return Recipe()


def set_recipe(recipe: Recipe) -> None:
    """Replace the session's recipe; every intervention gets fresh widget keys."""
    st.session_state.steer_items = [(next(_uid), iv) for iv in recipe.interventions]
    st.session_state.steer_positions = recipe.positions


def add_intervention(iv: Intervention) -> None:
    st.session_state.steer_items = [*st.session_state.steer_items, (next(_uid), iv)]


def remove_intervention(uid: int) -> None:
    st.session_state.steer_items = [(u, iv) for u, iv in st.session_state.steer_items if u != uid]


def max_act(index: FeatureIndex | None, name: str, latent: int) -> float | None:
    """The latent's max activation in the index (None without an index or when it never fired)."""
    if index is None or name not in index.saes:
        return None
    rows = index.summary(name, [latent])
    return float(rows["max_act"][0]) if len(rows) and rows["max_act"][0] else None


def top_tokens(index: FeatureIndex | None, name: str, tokenizer, latent: int) -> str:
    """The latent's top logit-lens tokens from the index, for tables ('' without an index)."""
    if index is None or name not in index.saes:
        return ""
    rows = index.summary(name, [latent])
    return token_text(tokenizer, rows["logit_pos_ids"][0]) if len(rows) else ""


def slider_range(iv: Intervention) -> tuple[float, float]:
    """Clamp: 0 to 3× the observed max (the notebooks use 0–1000 for Gemma Scope); add: ±3× the
    max (or ±4 in units of it); vectors: ±4 for CAVs (scaled to the mean activation norm),
    ±16 for mean-difference vectors."""
    top = float(iv.max_act) if iv.max_act else 100.0
    if iv.kind == "clamp":
        hi = max(3 * top, abs(iv.value) * 1.5, 1.0)
        return 0.0 if iv.value >= 0 else -hi, hi
    if iv.kind == "add":
        hi = 4.0 if iv.scale_by_max else max(3 * top, abs(iv.value) * 1.5, 1.0)
    else:
        hi = max(4.0 if iv.vector.kind == "cav" else 16.0, abs(iv.value) * 1.5)
    return -hi, hi


def current_recipe() -> Recipe:
    """The recipe as the sliders now say."""
    items = []
    for uid, iv in st.session_state.steer_items:
        value = st.session_state.get(f"steer_val_{uid}", iv.value)
        items.append(replace(iv, value=float(value)))
    return Recipe(tuple(items), st.session_state.get("steer_positions", "all"))


def sweep_figure(sw: Sweep, label: str) -> go.Figure:
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=sw.strengths, y=sw.target_post, name="target (after)",
                             mode="lines+markers", line_color="#ea580c"))
    fig.add_trace(go.Scatter(x=sw.strengths, y=sw.target_pre, name="target (model's own)",
                             mode="lines+markers", line=dict(color="#ea580c", dash="dot")))
    fig.add_trace(go.Scatter(x=sw.strengths, y=sw.kl, name="KL from baseline (nats)",
                             mode="lines+markers", line_color="#2563eb", yaxis="y2"))
    fig.update_layout(
        height=360, margin=dict(l=10, r=10, t=40, b=10), title=f"Strength sweep: {label}",
        xaxis_title="strength", yaxis_title="mean activation on generated tokens",
        yaxis2=dict(title="KL (nats)", overlaying="y", side="right", rangemode="tozero"),
        legend=dict(orientation="h", y=-0.25),
    )
    return fig


def token_table(tokenizer, pairs: list[tuple[int, float]], column: str) -> pd.DataFrame:
    return pd.DataFrame([(tokenizer.decode([t]), v) for t, v in pairs],
                        columns=[column, "Δ log-prob"])
