"""Drawing helpers for the Dreaming page: live figures, corpus reference points, exports."""

from __future__ import annotations

import json
from dataclasses import asdict

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from core.dreaming import (
    DreamStep,
    Objective,
    Reference,
    corpus_reference,
    correlation,
    pareto_front,
    token_values,
)
from core.feature_index import FeatureIndex
from core.models import LoadedModel
from core.saes import LoadedSAE
from ui.resources import SaeIndex
from ui.tokens import example_html

REF_EXAMPLES, REF_TOKENS = 12, 64
"""Corpus reference points: the top examples, each cut to BOS + the last tokens up to the
activating one (dream-sized texts, so their XE compares with the dreams' and scoring is quick)."""
MAX_POINTS = 4000
"""Most candidate points drawn on the scatter (the most recent; the frontier uses all)."""
ORANGE, BLUE, GREY, GREEN = "#ea580c", "#2563eb", "#94a3b8", "#16a34a"


@st.cache_data(show_spinner="Scoring the latent's top corpus examples", max_entries=64)
def _reference(index_path: str, sae_name: str, latent: int, kind: str,
               _lm: LoadedModel, _sae: LoadedSAE, _index: FeatureIndex) -> Reference:
    data = _index.latent(sae_name, latent)
    examples = [(ex.token_ids, ex.pos) for ex in data.top[:REF_EXAMPLES]]
    return corpus_reference(_lm, Objective.sae_latent(_sae, latent, kind), data.max_act,
                            examples, REF_TOKENS)


def reference(lm: LoadedModel, found: SaeIndex | None, objective: Objective) -> Reference | None:
    """Top corpus examples (prefix up to the activating token) when the SAE has an index."""
    if found is None or found.index is None or objective.kind == "vector":
        return None
    return _reference(str(found.path), found.name, objective.latent, objective.kind, lm,
                      objective.sae, found.index)


def alive_latents(found: SaeIndex | None) -> list[int] | None:
    """Latents that fired on the indexed corpus, or ``None`` without an index."""
    if found is None or found.index is None:
        return None
    return found.index.alive_latents(found.name)


def corpus_max(found: SaeIndex | None, latent: int) -> float | None:
    """The latent's max activation on the indexed corpus, or ``None`` without an index."""
    if found is None or found.index is None:
        return None
    return found.index.latent(found.name, latent).max_act


def progress_figure(history: list[DreamStep], ref: Reference | None) -> go.Figure:
    its = [s.iteration for s in history]
    fig = make_subplots(rows=1, cols=2, subplot_titles=("Best activation", "Its XE (fluency)"))
    fig.add_trace(go.Scatter(x=its, y=[s.best.activation for s in history], mode="lines+markers",
                             name="best activation", line_color=ORANGE, marker_size=4), 1, 1)
    fig.add_trace(go.Scatter(x=its, y=[s.best.xe for s in history], mode="lines+markers",
                             name="XE of the best", line_color=BLUE, marker_size=4), 1, 2)
    if ref is not None and ref.max_act is not None:
        fig.add_hline(y=ref.max_act, line_dash="dash", line_color=GREEN, row=1, col=1,
                      annotation_text=f"corpus max {ref.max_act:.2f}",
                      annotation_position="bottom right")
    fig.update_xaxes(title_text="iteration")
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=40, b=10), showlegend=False)
    return fig


def pareto_figure(history: list[DreamStep], ref: Reference | None) -> go.Figure:
    acts = [a for s in history for a in s.activations]
    xes = [x for s in history for x in s.xes]
    front = pareto_front(acts, xes)
    fig = go.Figure()
    shown = slice(max(0, len(acts) - MAX_POINTS), None)
    fig.add_trace(go.Scattergl(x=xes[shown], y=acts[shown], mode="markers", name="candidates",
                               marker=dict(color=GREY, size=4, opacity=0.5)))
    fig.add_trace(go.Scatter(x=[xes[i] for i in front], y=[acts[i] for i in front],
                             mode="lines+markers", name="Pareto frontier",
                             line=dict(color=ORANGE, shape="hv"), marker_size=6))
    if ref is not None and ref.activations:
        fig.add_trace(go.Scatter(x=ref.xes, y=ref.activations, mode="markers",
                                 name=f"top corpus examples ({REF_TOKENS}-token windows)",
                                 text=ref.texts,
                                 hovertemplate="%{text}<br>XE %{x:.2f} · act %{y:.2f}",
                                 marker=dict(color=GREEN, size=9, symbol="diamond")))
    if ref is not None and ref.max_act is not None:
        fig.add_hline(y=ref.max_act, line_dash="dash", line_color=GREEN,
                      annotation_text="corpus max", annotation_position="bottom right")
    best = history[-1].best
    fig.add_trace(go.Scatter(x=[best.xe], y=[best.activation], mode="markers", name="best",
                             marker=dict(color=ORANGE, size=14, symbol="star",
                                         line=dict(color="black", width=1))))
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=40, b=10),
                      title=f"Every evaluated candidate ({len(acts):,})",
                      xaxis_title="XE (lower is more fluent)", yaxis_title="activation",
                      legend=dict(orientation="h", y=-0.2))
    return fig


def enc_dec_figure(history: list[DreamStep]) -> tuple[go.Figure, float | None]:
    enc = [a for s in history for a in s.encoder]
    dec = [a for s in history for a in s.decoder]
    r = correlation(enc, dec)
    shown = slice(max(0, len(enc) - MAX_POINTS), None)
    fig = go.Figure(go.Scattergl(x=enc[shown], y=dec[shown], mode="markers",
                                 marker=dict(color=BLUE, size=4, opacity=0.5)))
    title = "Encoder vs decoder activation" + (f" (r = {r:.3f})" if r is not None else "")
    fig.update_layout(height=380, margin=dict(l=10, r=10, t=40, b=10), title=title,
                      xaxis_title="encoder pre-activation",
                      yaxis_title="projection on the decoder direction")
    return fig, r


def buffer_table(step: DreamStep) -> pd.DataFrame:
    return pd.DataFrame([(p.text, p.activation, p.xe, p.score, len(p.ids) - 1)
                         for p in step.buffer],
                        columns=["text", "activation", "XE", "score", "tokens"])


def best_html(lm: LoadedModel, objective: Objective, step: DreamStep, scale: float,
              limit: int = 3) -> str:
    """The best prompts with every token coloured by the objective."""
    rows = []
    for p in step.buffer[:limit]:
        values = _token_values(lm, objective, p.ids)
        rows.append(example_html(lm.tokenizer, p.activation, list(p.ids), values, scale,
                                 focus=len(p.ids) - 1))
    return "".join(rows)


def _token_values(lm: LoadedModel, objective: Objective, ids: tuple[int, ...]) -> list[float]:
    cache = st.session_state.setdefault("dream_token_values", {})
    key = (objective.label, ids)
    if key not in cache:
        if len(cache) > 64:
            cache.clear()
        cache[key] = token_values(lm, objective, ids)
    return cache[key]


def history_csv(history: list[DreamStep]) -> str:
    return pd.DataFrame([s.row() for s in history]).to_csv(index=False)


def history_json(history: list[DreamStep], meta: dict) -> str:
    steps = []
    for s in history:
        d = asdict(s)
        d["best"]["ids"] = list(s.best.ids)
        d["buffer"] = [{**asdict(p), "ids": list(p.ids)} for p in s.buffer]
        steps.append(d)
    return json.dumps({"run": meta, "steps": steps}, indent=1)
