"""Drawing helpers for the Lookup page: highlighted tokens, plots, and the in-app index build."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from core.index import IndexConfig, build_index, index_texts
from core.labels import LabelStore, auto_labels
from core.feature_index import EMBEDDED_INDEX, FeatureIndex, LatentData, window_activations
from core.models import LoadedModel, cache_dir, embedded_tokenizer
from core.saes import LoadedSAE

TOKEN_CSS = """
<style>
.tokens {font-family: ui-monospace, monospace; font-size: 0.85rem; line-height: 1.9;
         white-space: pre-wrap; word-break: break-word;}
.tokens span.t {border-radius: 3px; padding: 1px 0;}
.tokens span.special {border: 1px solid #999; border-radius: 3px; padding: 0 3px;
                      font-size: 0.7rem; color: #555; background: #eee;}
.tokens span.focus {outline: 2px solid #c2410c;}
.example {display: flex; gap: 0.8rem; align-items: baseline; margin-bottom: 0.35rem;}
.example .val {font-weight: 600; min-width: 3.5rem; text-align: right; font-size: 0.85rem;}
</style>
"""


@st.cache_resource(show_spinner=False, max_entries=8)
def open_index(path: str, mtime: float) -> FeatureIndex:
    return FeatureIndex(path)


def load_index(path: Path) -> FeatureIndex | None:
    """The index at ``path`` (reopened when the file changes), or ``None`` if there is none."""
    if not path.exists():
        return None
    return open_index(str(path), path.stat().st_mtime)


@st.cache_resource(show_spinner=False)
def _label_store(path: str) -> LabelStore:
    return LabelStore(path)


def label_store() -> LabelStore:
    """User labels, shared by every session of this server."""
    return _label_store(str(cache_dir() / "labels.duckdb"))


@st.cache_data(show_spinner=False, max_entries=16)
def cached_auto_labels(index_path: str, mtime: float, sae_name: str, _index: FeatureIndex,
                       _tokenizer) -> dict[int, str]:
    return auto_labels(_index, sae_name, _tokenizer)


def labels_for(index: FeatureIndex, sae_name: str, tokenizer, scope: str
               ) -> tuple[dict[int, str], dict[int, str]]:
    """(user labels, automatic labels) of one SAE in the index."""
    auto = cached_auto_labels(str(index.path), index.path.stat().st_mtime, sae_name, index,
                              tokenizer)
    try:
        user = label_store().all(scope)
    except ValueError:
        user = {}
    return user, auto


def merge_label_hits(found, hits: dict[int, str], index: FeatureIndex, sae_name: str):
    """Token-search results plus latents matched by label; label matches first."""
    import pandas as pd

    rows = index.summary(sae_name, list(hits))
    rows["match"] = [hits[int(i)] for i in rows["latent"]]
    merged = pd.concat([rows[["latent", "match", "firing_rate", "max_act"]], found])
    merged = merged.groupby("latent", as_index=False).agg(
        match=("match", lambda m: ", ".join(dict.fromkeys(m))),
        firing_rate=("firing_rate", "max"), max_act=("max_act", "max"))
    merged["by_label"] = merged["match"].str.contains("label")
    merged = merged.sort_values(["by_label", "max_act"], ascending=[False, False])
    return merged.drop(columns="by_label").reset_index(drop=True)


def token_label(tokenizer, token_id: int) -> tuple[str, bool]:
    """(what to print, whether it is a special token)."""
    if token_id in tokenizer.all_special_ids:
        return tokenizer.convert_ids_to_tokens(token_id), True
    text = tokenizer.decode([token_id])
    if "\ufffd" in text:  # a piece of a multi-byte character: show the raw token instead
        text = tokenizer.convert_ids_to_tokens(token_id)
    added = getattr(tokenizer, "added_tokens_decoder", {}).get(token_id)
    if added is not None and added.special:
        return text, True
    return text.replace("\n", "↵\n"), False


def tokens_html(tokenizer, ids: list[int], values: list[float], scale: float,
                focus: int | None = None) -> str:
    """Tokens coloured by activation (hover shows the value); special tokens drawn as boxes."""
    out = []
    for i, (tok, val) in enumerate(zip(ids, values)):
        text, special = token_label(tokenizer, int(tok))
        alpha = 0.0 if scale <= 0 else min(max(val / scale, 0.0), 1.0)
        cls = "special" if special else "t"
        if i == focus:
            cls += " focus"
        style = f"background: rgba(234, 88, 12, {alpha:.2f});" if alpha > 0 else ""
        title = html.escape(f"{text!r} · activation {val:.3f}")
        out.append(f'<span class="{cls}" style="{style}" title="{title}">'
                   f"{html.escape(text)}</span>")
    return '<div class="tokens">' + "".join(out) + "</div>"


@st.cache_data(show_spinner="Recomputing activations in the context windows", max_entries=256)
def cached_window_acts(index_path: str, sae_name: str, latent: int, seqs: tuple[int, ...],
                       _lm: LoadedModel, _sae: LoadedSAE, _windows: list[list[int]]):
    return window_activations(_lm, _sae, _windows, latent)


def examples_html(lm: LoadedModel, sae: LoadedSAE, index: FeatureIndex, sae_name: str,
                  data: LatentData, examples, left: int = 24, right: int = 6) -> list[str]:
    """One highlighted context per example, trimmed around the activating token."""
    if not examples:
        return []
    acts = cached_window_acts(str(index.path), sae_name, data.latent,
                              tuple(ex.seq for ex in examples), lm, sae,
                              [ex.token_ids for ex in examples])
    scale = data.max_act or 1.0
    out = []
    for ex, row in zip(examples, acts):
        lo, hi = max(0, ex.pos - left), min(len(ex.token_ids), ex.pos + right + 1)
        block = tokens_html(lm.tokenizer, ex.token_ids[lo:hi], row[lo:hi], scale,
                            focus=ex.pos - lo)
        out.append(f'<div class="example"><span class="val">{ex.value:.2f}</span>{block}</div>')
    return out


def activation_histogram(data: LatentData) -> go.Figure:
    bins = len(data.hist_counts)
    width = data.hist_max / bins if bins else 1
    centers = [(i + 0.5) * width for i in range(bins)]
    fig = go.Figure(go.Bar(x=centers, y=data.hist_counts, width=width * 0.95,
                           marker_color="#ea580c"))
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10),
                      title=f"Non-zero activations (uniform sample of {data.sample_size})",
                      xaxis_title="activation", yaxis_title="tokens")
    return fig


def density_figure(log10_density: list[float], mark: float | None = None,
                   title: str = "Feature density") -> go.Figure:
    """log10 firing rates; dead latents (never fire) drawn as one bar in a band on the left."""
    values = np.array(log10_density)
    alive = values[values > -10]
    dead = int((values <= -10).sum())
    left = (alive.min() if alive.size else -6.0) - 0.6
    fig = go.Figure(go.Histogram(x=alive, nbinsx=40, marker_color="#64748b", name="alive"))
    if dead:
        fig.add_trace(go.Bar(x=[left + 0.25], y=[dead], width=0.3, marker_color="#dc2626",
                             name="dead"))
        fig.add_vrect(x0=left, x1=left + 0.5, fillcolor="#dc2626", opacity=0.10, line_width=0,
                      annotation_text=f"dead ({dead})", annotation_position="top left")
    fig.add_vrect(x0=-1, x1=0, fillcolor="#dc2626", opacity=0.12, line_width=0,
                  annotation_text="dense", annotation_position="top left")
    if mark is not None:
        fig.add_vline(x=mark, line_color="#ea580c", line_width=3,
                      annotation_text="this latent", annotation_position="top")
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10), showlegend=False,
                      title=title, xaxis_title="log10 firing rate",
                      yaxis_title="latents (log scale)", yaxis_type="log", bargap=0.05)
    return fig


def build_index_form(lm: LoadedModel, sae: LoadedSAE, path: Path, sae_name: str) -> None:
    """Offer to build an index for an SAE that has none, with progress."""
    st.info("This SAE has no feature index yet. Build one here (a small one takes a minute on a "
            "CPU), or on a GPU machine with `python -m core.index` (see README).")
    sources = []
    if EMBEDDED_INDEX.exists():
        sources.append("Text of the shipped index")
    sources += ["Upload .txt / .jsonl"]
    with st.form("lookup_build"):
        source = st.radio("Corpus", sources, horizontal=True)
        upload = st.file_uploader("Corpus file", type=["txt", "jsonl"])
        default = 20_000 if lm.device.type == "cpu" else 500_000
        tokens = st.number_input("Tokens to read", 2_000, 5_000_000, default, step=10_000)
        go_build = st.form_submit_button("Build index", type="primary")
    if not go_build:
        return
    if source.startswith("Upload"):
        if upload is None:
            st.error("Choose a .txt or .jsonl file first.")
            return
        tmp = path.with_suffix(".upload" + Path(upload.name).suffix)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(upload.getvalue())
        texts = index_texts(tmp)
    else:
        shipped = load_index(EMBEDDED_INDEX)
        texts = shipped.texts(lm.tokenizer if lm.name == shipped.meta["model"]
                              else embedded_tokenizer())
    bar = st.progress(0.0, text="Starting")
    try:
        build_index(lm, {sae_name: sae}, texts, path, IndexConfig(max_tokens=int(tokens)),
                    corpus_name=source, progress=lambda f, m: bar.progress(min(f, 1.0), text=m))
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as exc:
        st.error(f"Index build failed: {exc}")
        return
    st.success(f"Index written to {path}")
    st.rerun()
