"""Steering page helpers: the recipe in session state, slider ranges, the generation panel,
concept vectors, plots and tables."""

from __future__ import annotations

import html
import itertools
from collections.abc import Callable
from dataclasses import replace

import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

from core.feature_index import FeatureIndex
from core.models import EMBEDDED_MODEL_NAME, LoadedModel
from core.saes import LoadedSAE
from core.steering import (
    GenConfig,
    GenResult,
    Intervention,
    Recipe,
    Scored,
    Sweep,
    latent_shifts,
    score_on_text,
    stream,
)
from core.vectors import ConceptVector, caa_vector, parse_pairs, read_labelled, train_cav
from ui.safe_text import as_text
from ui.resources import names_of
from ui.state import link_url

STARTER = Recipe((Intervention("clamp", 2000.0, latent=1545),), "all")
"""Offline starter: w4096 latent 1545, whose top logit-lens tokens are family / families / família,
clamped at about 1.6× its max activation in the index: strong enough to bring the word into every
prompt's continuation, weak enough that the text stays readable (at 2,500 it repeats "Family")."""
STARTER_WORDS = r"\bfamil(y|ies|ial)\b"
"""What the starter clamp should make the model write (tests and benchmarks count it)."""
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
    if index is None:
        return None
    rows = index.summary(name, [latent])
    return float(rows["max_act"][0]) if len(rows) and rows["max_act"][0] else None


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


def slider_step(lo: float, hi: float) -> float:
    span = (hi - lo) / 200
    return float(f"{span:.1g}") if span > 0 else 0.01


def current_recipe() -> Recipe:
    """The recipe as the sliders now say."""
    items = []
    for uid, iv in st.session_state.steer_items:
        value = st.session_state.get(f"steer_val_{uid}", iv.value)
        items.append(replace(iv, value=float(value)))
    return Recipe(tuple(items), st.session_state.get("steer_positions", "all"))


def sweep_figure(sw: Sweep, iv: Intervention) -> go.Figure:
    """Two panels on one strength axis: the target as the next layers read it, and the KL."""
    what = "latent" if iv.kind != "vector" else "projection on the vector"
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.12, subplot_titles=(
        f"Target {what}, mean over generated tokens", "KL(steered ‖ baseline), nats"))
    fig.add_trace(go.Scatter(
        x=sw.strengths, y=sw.target_post, mode="lines+markers", line_color="#ea580c",
        name="after the intervention: the SAE re-reads the steered residual (what later "
             "layers see)"), 1, 1)
    fig.add_trace(go.Scatter(
        x=sw.strengths, y=sw.target_pre, mode="lines+markers",
        line=dict(color="#ea580c", dash="dot"),
        name="before it: the model's own activation on the steered text"), 1, 1)
    if iv.kind == "clamp":
        fig.add_trace(go.Scatter(x=sw.strengths, y=sw.strengths, mode="lines",
                                 line=dict(color="#94a3b8", dash="dash"),
                                 name="the clamp value written"), 1, 1)
    fig.add_trace(go.Scatter(x=sw.strengths, y=sw.kl, mode="lines+markers", line_color="#2563eb",
                             name="KL on the baseline's text"), 1, 2)
    fig.update_xaxes(title_text="strength" if iv.kind != "clamp" else "clamp value",
                     tickformat=".3~s")
    fig.update_yaxes(rangemode="tozero", tickformat=".3~s", row=1, col=1)
    fig.update_yaxes(rangemode="tozero", tickformat=".2~f", row=1, col=2)
    fig.update_layout(height=400, margin=dict(l=10, r=10, t=60, b=10),
                      title=f"Strength sweep: {swept_name(iv)}",
                      legend=dict(orientation="h", y=-0.3, x=0))
    return fig


def swept_name(iv: Intervention) -> str:
    """What a sweep varies, without the value it varies ("clamp of latent #1545")."""
    if iv.kind == "vector":
        return f"adding vector {iv.vector.name}"
    return f"{'clamp of' if iv.kind == 'clamp' else 'adding'} latent #{iv.latent}"


def number(v: float) -> str:
    """A strength for reading: 11,653 rather than 1.165e+04; 0.25 stays 0.25."""
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.3g}"


def sweep_table(sw: Sweep) -> pd.DataFrame:
    """One row per strength, rounded for reading (4 significant digits)."""
    return pd.DataFrame({"strength": [float(f"{s:.4g}") for s in sw.strengths],
                         "target after": sw.target_post, "KL": sw.kl, "text": sw.texts})


def sweep_defaults(iv: Intervention) -> tuple[float, float]:
    """From and To of a sweep of ``iv``: its slider's range (a clamp starts at 0)."""
    lo, hi = slider_range(iv)
    return (max(lo, 0.0) if iv.kind == "clamp" else lo), hi


def token_table(tokenizer, pairs: list[tuple[int, float]], column: str) -> pd.DataFrame:
    return pd.DataFrame([(tokenizer.decode([t]), v) for t, v in pairs],
                        columns=[column, "Δ log-prob"])


# --- generation -------------------------------------------------------------------------------


@st.fragment
def generate_panel(lm: LoadedModel, sae: LoadedSAE | None, recipe: Recipe,
                   cfg: GenConfig | None, index: FeatureIndex | None, name: str | None) -> None:
    """Baseline and steered text streamed side by side, then what else the steering moved."""
    b = st.columns([3, 1, 3])
    go_now = b[0].button("Generate baseline and steered", type="primary",
                         key="steer_generate", disabled=cfg is None, width="stretch")
    b[1].button("Stop", key="steer_stop", width="stretch",
                help="Ends the generation after the current token; the text so far stays.")
    cols = st.columns(2)
    cols[0].markdown("**Baseline**")
    cols[1].markdown("**Steered**")
    slots = [cols[0].empty(), cols[1].empty()]
    if go_now:
        prompt = st.session_state.steer_prompt
        st.session_state.pop("steer_stopped", None)
        result: list = []
        toks: list[list[int]] = [[], []]
        try:
            recipe.check(sae, lm)
            finished = [False, False]
            steps = stream(lm, sae, prompt, [None, recipe], cfg, result=result)
            try:  # a click (Stop) interrupts the loop; the stream holds no hook between tokens
                for step in steps:
                    for r in range(2):
                        if not finished[r]:
                            toks[r].append(step.tokens[r])
                        finished[r] = step.done[r]
                        slots[r].markdown(text_box(lm.tokenizer.decode(
                            toks[r], skip_special_tokens=True) + " ▌", prompt),
                            unsafe_allow_html=True)
            finally:
                steps.close()
                if not result and any(toks):  # stopped: keep what was generated
                    st.session_state.steer_stopped = (prompt, recipe, [
                        lm.tokenizer.decode(t, skip_special_tokens=True) for t in toks])
            res = result[0]
            with st.spinner("Comparing next-token distributions"):
                scored = score_on_text(lm, sae, res.prompt_ids + res.rows[0],
                                       len(res.prompt_ids), [recipe])
            st.session_state.steer_out = (prompt, recipe, res, scored)
        except ValueError as exc:
            st.error(as_text(str(exc)))
    stopped = st.session_state.get("steer_stopped")
    if stopped is not None:
        prompt, used, texts = stopped
        for r in range(2):
            slots[r].markdown(text_box(texts[r], prompt), unsafe_allow_html=True)
        st.caption("Stopped: the text above is what was generated until then. Press Generate "
                   "to run it again.")
        return
    out = st.session_state.get("steer_out")
    if out is None:
        slots[0].caption("Press Generate: both run as one batch, same seed and noise.")
        return
    prompt, used, res, scored = out
    for r in range(2):
        slots[r].markdown(text_box(res.texts[r], prompt), unsafe_allow_html=True)
    if used != recipe:
        st.caption("The recipe changed since this output; press Generate again.")
    st.caption(f"{sum(map(len, res.rows))} tokens in {res.seconds:.1f} s "
               f"({res.tokens_per_second:.1f} tokens/s, both rows in one batch) · "
               f"KL(steered ‖ baseline) on the baseline text: {scored.kl[0]:.3f} nats")
    side_effects(lm, sae, res, scored, used, index, name)


def side_effects(lm: LoadedModel, sae: LoadedSAE | None, res: GenResult, scored: Scored,
                 used: Recipe, index: FeatureIndex | None, name: str | None) -> None:
    st.markdown("##### What else moved")
    a, b = st.columns(2)
    a.dataframe(token_table(lm.tokenizer, scored.logit_up[0], "promoted token"),
                hide_index=True, width="stretch")
    b.dataframe(token_table(lm.tokenizer, scored.logit_down[0], "suppressed token"),
                hide_index=True, width="stretch")
    own = {iv.latent for iv in used.interventions if iv.latent is not None}
    typical = None
    if index is not None and name and res.readout.latents_pre is not None:
        typical = index.summary(name)["mean_act"].to_numpy()
        if len(typical) != res.readout.latents_pre.shape[-1]:
            typical = None  # an index of another SAE: rank by raw activation
    shifts = latent_shifts(res.readout, 1, top=10, exclude=own, typical=typical)
    if shifts:
        df = pd.DataFrame(shifts, columns=["latent", "baseline", "steered", "change"])
        if typical is None:
            df = df.drop(columns="change")
        names = names_of(index, name, lm, sae, df["latent"])
        df["fires on"] = [names[i].fires_on for i in df["latent"]]
        df["logit lens"] = [names[i].logit_lens for i in df["latent"]]
        df["open"] = [link_url("lookup", latent=i) for i in df["latent"]]
        st.dataframe(df, hide_index=True, width="stretch", column_config={
            "open": st.column_config.LinkColumn("lookup", display_text="open"),
            "baseline": st.column_config.NumberColumn(format="%.1f"),
            "steered": st.column_config.NumberColumn(format="%.1f"),
            "change": st.column_config.NumberColumn(
                "× typical", format="%+.2f",
                help="Steered minus baseline, in units of the latent's typical activation "
                     "(its mean when firing in the index)")})
    ranked = ("ranked by the change in units of each latent's typical activation (its mean "
              "when firing in the index), so a rare latent switching on outranks a dense one "
              "whose large activations wobble" if typical is not None
              else "ranked by the change in activation")
    st.caption("Tokens: mean change in log-probability when the steered model reads the "
               "baseline's text. Latents: mean activation over generated tokens (before "
               f"the intervention) in each row, the intervened latents left out, {ranked}.")


def text_box(text: str, prompt: str) -> str:
    return (f'<div style="border:1px solid #ddd;border-radius:6px;padding:0.6rem;'
            f'min-height:6rem;white-space:pre-wrap;font-size:0.92rem">'
            f'<span style="color:#888">{html.escape(prompt)}</span>'
            f'{html.escape(text)}</div>')


# --- concept vectors --------------------------------------------------------------------------


def keep_vector(make: Callable[[], ConceptVector],
                describe: Callable[[ConceptVector], str]) -> None:
    """Make a concept vector, keep it for this session and say how it turned out."""
    try:
        vec = make()
    except ValueError as exc:
        st.error(as_text(str(exc)))
        return
    st.session_state.steer_vectors[vec.name] = vec
    st.success(as_text(describe(vec)))


def cav_from_rows(lm: LoadedModel, hook: str, raw: str | bytes | None,
                  positive: str) -> ConceptVector:
    if not raw:
        raise ValueError("Paste or upload text,label rows first.")
    texts, labs = read_labelled(raw)
    with st.spinner(f"Reading {len(texts)} texts"):
        return train_cav(lm, hook, texts, labs, positive.strip())


def caa_from_pairs(lm: LoadedModel, hook: str, pairs_text: str) -> ConceptVector:
    with st.spinner("Reading the pairs"):
        return caa_vector(lm, hook, parse_pairs(pairs_text))
