"""Drawing helpers for the Dreaming page: live figures, corpus reference points, exports."""

from __future__ import annotations

import json
from dataclasses import asdict

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from core.dream_passes import Reference, corpus_reference, token_values
from core.dreaming import FLUENT_XE, DreamStep, Objective, best_fluent, correlation
from core.feature_index import FeatureIndex
from core.models import LoadedModel
from core.saes import LoadedSAE
from ui.resources import SaeIndex
from ui.tokens import example_html

REF_EXAMPLES = 12
"""Corpus reference points: the top examples, each scored with its whole context up to the
activating token, as the index measured it."""
MAX_POINTS = 4000
"""Most candidate points drawn on the scatter (the most recent; the frontier uses all)."""
ORANGE, BLUE, GREY, GREEN, PURPLE = "#ea580c", "#2563eb", "#94a3b8", "#16a34a", "#7c3aed"


@st.cache_data(show_spinner="Scoring the latent's top corpus examples", max_entries=64)
def _reference(index_path: str, sae_name: str, latent: int, kind: str,
               _lm: LoadedModel, _sae: LoadedSAE, _index: FeatureIndex) -> Reference:
    data = _index.latent(sae_name, latent)
    examples = [(ex.token_ids, ex.pos) for ex in data.top[:REF_EXAMPLES]]
    return corpus_reference(_lm, Objective.sae_latent(_sae, latent, kind), data.max_act,
                            examples)


def reference(lm: LoadedModel, found: SaeIndex | None, objective: Objective) -> Reference | None:
    """Top corpus examples (whole context up to the activating token) when the SAE has an
    index."""
    if found is None or found.index is None or objective.kind == "vector":
        return None
    return _reference(str(found.path), found.name, objective.latent, objective.kind, lm,
                      objective.sae, found.index)


def alive_latents(found: SaeIndex | None) -> list[int] | None:
    """Alive latents with examples in the index (what Random picks), or ``None`` without one."""
    if found is None or found.index is None:
        return None
    return found.index.alive_latents(found.name, with_examples=True)


def silent_note(found: SaeIndex, latent: int) -> str:
    """Why a latent outside :func:`alive_latents` has no corpus reference, with the counts."""
    stats = found.index.sae_stats(found.name)
    row = found.index.latent(found.name, latent)
    counted, indexed = int(stats["density_tokens"]), int(stats["tokens"])
    if row.firing_count:
        where = (f"fired {row.firing_count:,} times in the {counted:,} tokens counted, but "
                 f"never on the {indexed:,} indexed ones")
    else:
        where = f"never fired in the {counted:,} tokens counted (dead)"
    return (f"Latent {latent} {where}, so there is no corpus reference; dreaming may still find "
            "text that drives it up.")


def corpus_max(found: SaeIndex | None, latent: int) -> float | None:
    """The latent's max activation on the indexed corpus, or ``None`` without an index."""
    if found is None or found.index is None:
        return None
    return found.index.latent(found.name, latent).max_act


def corpus_top1(ref: Reference | None) -> float | None:
    """The latent's corpus top-1, or ``None`` without an index or for a latent that never fired
    there."""
    return ref.max_act if ref is not None and ref.max_act and ref.max_act > 0 else None


def _top1_line(fig: go.Figure, ref: Reference | None, **where) -> None:
    if corpus_top1(ref) is not None:
        fig.add_hline(y=ref.max_act, line_dash="dash", line_color=GREEN, **where,
                      annotation_text=f"corpus top-1 {ref.max_act:,.1f}",
                      annotation_position="bottom right")


def progress_figure(history: list[DreamStep], ref: Reference | None) -> go.Figure:
    its = [s.iteration for s in history]
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        "Activation: strongest and best fluent prompt", "XE of the buffer's best"))
    fig.add_trace(go.Scatter(x=its, y=[s.front[-1].activation if s.front else None
                                       for s in history], mode="lines",
                             name="strongest prompt", line_color=ORANGE), 1, 1)
    fluent = [best_fluent(s.front) for s in history]
    fig.add_trace(go.Scatter(x=its, y=[p.activation if p else None for p in fluent],
                             mode="lines", name=f"best fluent (XE ≤ {FLUENT_XE:g})",
                             line_color=BLUE), 1, 1)
    fig.add_trace(go.Scatter(x=its, y=[s.best.xe for s in history], mode="lines+markers",
                             name="XE of the buffer's best", line_color=PURPLE, marker_size=4),
                  1, 2)
    _top1_line(fig, ref, row=1, col=1)
    fig.update_xaxes(title_text="iteration")
    fig.update_layout(height=300, margin=dict(l=10, r=10, t=40, b=10),
                      legend=dict(orientation="h", y=-0.3))
    return fig


def pareto_figure(history: list[DreamStep], ref: Reference | None,
                  fluent_cap: float = 0.0) -> go.Figure:
    """Every candidate on activation vs XE, the front, the fluent band, the corpus reference
    and, when the run has a fluent-cap member, its cap as a dotted line."""
    acts = [a for s in history for a in s.activations]
    xes = [x for s in history for x in s.xes]
    front = history[-1].front
    fig = go.Figure()
    fig.add_vrect(x0=0, x1=FLUENT_XE, fillcolor=BLUE, opacity=0.06, line_width=0,
                  annotation_text=f"fluent (XE ≤ {FLUENT_XE:g})",
                  annotation_position="top left")
    if fluent_cap > 0:
        fig.add_vline(x=fluent_cap, line_color=BLUE, line_dash="dot", line_width=1.5,
                      annotation_text=f"fluent cap {fluent_cap:g}",
                      annotation_position="bottom right")
    shown = slice(max(0, len(acts) - MAX_POINTS), None)
    fig.add_trace(go.Scattergl(x=xes[shown], y=acts[shown], mode="markers", name="candidates",
                               marker=dict(color=GREY, size=4, opacity=0.5)))
    fig.add_trace(go.Scatter(x=[p.xe for p in front], y=[p.activation for p in front],
                             mode="lines+markers", name="Pareto front",
                             text=[p.text for p in front],
                             hovertemplate="%{text}<br>XE %{x:.2f} · act %{y:.2f}",
                             line=dict(color=ORANGE, shape="hv"),
                             marker=dict(size=7, color=[BLUE if p.fluent else ORANGE
                                                        for p in front])))
    if ref is not None and ref.activations:
        fig.add_trace(go.Scatter(x=ref.xes, y=ref.activations, mode="markers",
                                 name="top corpus examples (whole context)",
                                 text=ref.texts,
                                 hovertemplate="%{text}<br>XE %{x:.2f} · act %{y:.2f}",
                                 marker=dict(color=GREEN, size=9, symbol="diamond")))
    _top1_line(fig, ref)
    best = history[-1].best
    fig.add_trace(go.Scatter(x=[best.xe], y=[best.activation], mode="markers",
                             name="buffer's best",
                             marker=dict(color=ORANGE, size=14, symbol="star",
                                         line=dict(color="black", width=1))))
    fig.update_layout(height=400, margin=dict(l=10, r=10, t=40, b=10),
                      title=f"Every evaluated candidate ({len(acts):,}) and the Pareto front",
                      xaxis_title="XE, nats per token (lower is more fluent)",
                      yaxis_title="activation", legend=dict(orientation="h", y=-0.25))
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


def front_table(step: DreamStep, top1: float | None,
                cuts: set[tuple[int, ...]] = frozenset()) -> pd.DataFrame:
    """The Pareto front, strongest first, with whether each prompt is fluent, reaches the
    corpus top-1, and is a starting cut of a corpus example (``cuts``) or a dream."""
    rows = [(p.text, p.activation, p.xe, p.fluent,
             None if top1 is None else p.activation >= top1, len(p.ids) - 1,
             "corpus cut" if p.ids in cuts else "dream")
            for p in reversed(step.front)]
    return pd.DataFrame(rows, columns=["text", "activation", "XE", "fluent",
                                       "≥ corpus top-1", "tokens", "from"])


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
    for i, s in enumerate(history):
        d = asdict(s)
        d["best"]["ids"] = list(s.best.ids)
        d["buffer"] = [{**asdict(p), "ids": list(p.ids)} for p in s.buffer]
        if i < len(history) - 1:  # the front only grows: the last step's holds the run's
            del d["front"]
        else:
            d["front"] = [{**asdict(p), "ids": list(p.ids)} for p in s.front]
        steps.append(d)
    return json.dumps({"run": meta, "steps": steps}, indent=1)
