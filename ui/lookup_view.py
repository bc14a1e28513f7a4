"""Drawing helpers for the Lookup page: highlighted contexts, plots, and the in-app index build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from core import feature_index
from core.density import DEAD_LOG10, DENSE_RATE
from core.feature_index import FeatureIndex, LatentData, window_activations
from core.index import BuildRunning, IndexConfig, build_index, build_running, corpus_texts
from core.index_ray import RayConfig, configured_address
from core.models import LoadedModel, embedded_tokenizer
from core.saes import CardFigures, LoadedSAE
from ui.resources import load_index
from ui.safe_text import as_text
from ui.tokens import example_html


@st.cache_data(show_spinner="Recomputing activations in the context windows", max_entries=256)
def cached_window_acts(index_path: str, sae_name: str, latent: int, seqs: tuple[int, ...],
                       _lm: LoadedModel, _sae: LoadedSAE, _windows: list[list[int]]):
    return window_activations(_lm, _sae, _windows, latent)


def examples_html(lm: LoadedModel, sae: LoadedSAE, index: FeatureIndex, sae_name: str,
                  data: LatentData, examples) -> list[str]:
    """One highlighted context per example, trimmed around the activating token: the span and
    its activations as the index stores them (an index of schema 1 has none; then the windows
    run through the model once, cached)."""
    if not examples:
        return []
    scale = data.max_act or 1.0
    if any(ex.acts is None for ex in examples):
        acts = cached_window_acts(str(index.path), sae_name, data.latent,
                                  tuple(ex.seq for ex in examples), lm, sae,
                                  [ex.token_ids for ex in examples])
        spans = []
        for ex, row in zip(examples, acts):
            lo = max(0, ex.pos - index.show_left)
            hi = min(len(ex.token_ids), ex.pos + index.show_right + 1)
            spans.append((lo, row[lo:hi]))
    else:
        spans = [(ex.acts_start, ex.acts) for ex in examples]
    out = []
    for ex, (lo, values) in zip(examples, spans):
        out.append(example_html(lm.tokenizer, ex.value, ex.token_ids[lo:lo + len(values)],
                                values, scale, focus=ex.pos - lo))
    return out


def nonzero_histogram(data: LatentData) -> tuple[list[int], int]:
    """(counts per bin, values that went in) of the latent's sampled non-zero activations.

    Indexes built before the firing samples were drawn from firing tokens only hold zeros in
    their sample (a latent that fired 14 times had 256 "samples"); those zeros sit in the first
    bin and are taken out here: a sample cannot hold more firing tokens than the latent has."""
    counts = list(data.hist_counts)
    zeros = max(0, data.sample_size - data.firing_count) if counts else 0
    if zeros:
        counts[0] = max(0, counts[0] - zeros)
    return counts, sum(counts)


def activation_histogram(data: LatentData) -> go.Figure:
    counts, n = nonzero_histogram(data)
    bins = len(counts)
    width = data.hist_max / bins if bins else 1
    centers = [(i + 0.5) * width for i in range(bins)]
    fig = go.Figure(go.Bar(x=centers, y=counts, width=width * 0.95, marker_color="#ea580c",
                           hovertemplate="%{x:.3~g}: %{y} tokens<extra></extra>"))
    sampled = "all of them" if n >= data.firing_count else "a uniform sample"
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10),
                      title=f"Non-zero activations: {n:,} values ({sampled})",
                      xaxis_title="activation", yaxis_title="tokens", xaxis_rangemode="tozero")
    return fig


def density_figure(log10_density: list[float], tokens: int, mark: float | None = None,
                   title: str = "Feature density") -> go.Figure:
    """log10 firing rates counted on ``tokens`` tokens; dead latents (never fired there) drawn as
    one labelled bar in a band on the left."""
    values = np.array(log10_density)
    alive = values[values > DEAD_LOG10]
    dead = int((values <= DEAD_LOG10).sum())
    left = (alive.min() if alive.size else -6.0) - 0.6
    fig = go.Figure(go.Histogram(x=alive, nbinsx=40, marker_color="#64748b", name="alive"))
    if dead:
        fig.add_trace(go.Bar(x=[left + 0.25], y=[dead], width=0.3, marker_color="#dc2626",
                             name="dead"))
        fig.add_vrect(x0=left, x1=left + 0.5, fillcolor="#dc2626", opacity=0.10, line_width=0)
        # the count sits above its bar, starting at the band's left edge: clear of the bar
        fig.add_annotation(x=left, y=np.log10(dead), yshift=4, text=f"dead: {dead:,}",
                           showarrow=False, xanchor="left", yanchor="bottom",
                           font=dict(color="#dc2626", size=12))
    fig.add_vrect(x0=np.log10(DENSE_RATE), x1=0, fillcolor="#dc2626", opacity=0.12,
                  line_width=0, annotation_text="dense", annotation_position="top right")
    if mark is not None:
        fig.add_vline(x=mark, line_color="#ea580c", line_width=3,
                      annotation_text="this latent", annotation_position="top")
    tallest = max(dead, int(np.histogram(alive, 40)[0].max()) if alive.size else 1, 1)
    fig.update_layout(height=280, margin=dict(l=10, r=10, t=50, b=10), showlegend=False,
                      title=f"{title} (counted on {tokens:,} tokens)",
                      xaxis_title="log10 firing rate", bargap=0.05,
                      yaxis=dict(title="latents (log scale)", type="log",
                                 range=[-0.1, np.log10(tallest) + 0.6]))  # room for the label
    return fig


def interval_groups(data: LatentData, n_intervals: int
                    ) -> tuple[list[tuple[int, float, float, list]], list[int]]:
    """The activation-interval samples grouped by interval, highest first, and the numbers
    (1-based) of the intervals that hold no sample."""
    groups: dict = {}
    for i, lo, hi, ex in data.intervals:
        groups.setdefault((i, lo, hi), []).append(ex)
    empty = sorted(set(range(1, n_intervals + 1)) - {i + 1 for i, _, _ in groups})
    return [(i, lo, hi, exs) for (i, lo, hi), exs in groups.items()], empty


def numbers(values: list[int]) -> str:
    """[1, 2, 3, 5] -> "1–3, 5"."""
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][-1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 2 else ", ".join(map(str, r)) for r in runs)


def build_index_form(lm: LoadedModel, sae: LoadedSAE, path: Path, sae_name: str) -> None:
    """Offer to build an index for an SAE that has none, with progress. ``path`` is in the cache
    directory; one build per file runs at a time, and the page says when one is running."""
    if build_running(path):
        st.info("A build of this index is running (started from another session or process). "
                "It appears here when it is done.")
        st.button("Check again", key="lookup_build_check")
        return
    st.info("This SAE has no feature index yet. Build one here (a small one takes a minute on a "
            "CPU), or on a GPU machine with `python -m core.index` (see README).")
    shipped = None
    try:
        shipped = load_index(feature_index.EMBEDDED_INDEX)
    except ValueError:
        pass  # an old or damaged shipped index offers no text; index_for reported it
    sources = (["Text of the shipped index"] if shipped is not None else []) + [
        "Upload .txt / .jsonl"]
    with st.form("lookup_build"):
        source = st.radio("Corpus", sources, horizontal=True, key="lookup_build_source")
        upload = st.file_uploader("Corpus file", type=["txt", "jsonl"],
                                  key="lookup_build_upload")
        default = 20_000 if lm.device.type == "cpu" else 500_000
        tokens = st.number_input("Tokens to read", 2_000, 5_000_000, default, step=10_000,
                                 key="lookup_build_tokens")
        cluster, on_ray, workers = configured_address(), False, 2
        if cluster:
            left, right = st.columns([3, 1])
            on_ray = left.checkbox(f"Build on the Ray cluster at {as_text(cluster)}", True,
                                   key="lookup_build_ray",
                                   help="Each worker loads the model and this SAE once and "
                                   f"indexes shards of {IndexConfig().shard_windows} windows; "
                                   "the index is the same as a build here.")
            workers = right.number_input("Workers", 1, 256, 2, key="lookup_build_workers")
        go_build = st.form_submit_button("Build index", type="primary")
    if not go_build:
        return
    try:
        if source.startswith("Upload"):
            if upload is None:
                st.error("Choose a .txt or .jsonl file first.")
                return
            kind = "jsonl" if upload.name.lower().endswith(".jsonl") else "txt"
            texts = corpus_texts(upload.getvalue(), kind, upload.name)
        else:
            texts = shipped.texts(lm.tokenizer if lm.name == shipped.meta["model"]
                                  else embedded_tokenizer())
        bar = st.progress(0.0, text="Starting")
        build_index(lm, {sae_name: sae}, texts, path, IndexConfig(max_tokens=int(tokens)),
                    corpus_name=source if not source.startswith("Upload") else upload.name,
                    progress=lambda f, m: bar.progress(min(f, 1.0), text=m),
                    ray=RayConfig(address=cluster, workers=int(workers)) if on_ray else None)
    except BuildRunning as exc:
        st.info(str(exc))
        return
    except (ValueError, FileNotFoundError) as exc:
        st.error(as_text(f"Index build failed: {exc}"))
        return
    st.success(f"Index written to {path}")
    st.rerun()


def card_metrics(card: CardFigures) -> None:
    """The SAE's figures from its family's card, measured on held-out text when it was made."""
    st.markdown(f"**From the family's card** (held-out text: {card.tokens:,} tokens; "
                f"cross-entropy on {card.ce_tokens:,})")
    c = st.columns(5)
    c[0].metric("L0", f"{card.l0:.1f}", help=f"Latents firing per token, on {card.tokens:,} tokens")
    c[1].metric("FVE", f"{card.fve:.3f}", help="Fraction of the hook's variance the "
                f"reconstruction explains, on {card.tokens:,} tokens")
    c[2].metric("CE increase", f"{card.ce_increase:+.3f} nats",
                help=f"The model's next-token cross-entropy with the reconstruction spliced in "
                f"at the hook ({card.ce_spliced:.3f}) minus without ({card.ce_clean:.3f}), on "
                f"{card.ce_tokens:,} tokens")
    c[3].metric("CE recovered", f"{card.ce_recovered:.1%}",
                help="How much of the loss from zeroing the hook the reconstruction wins back: "
                "(CE zeroed − CE spliced) / (CE zeroed − CE clean)")
    c[4].metric("Dead latents", f"{card.dead_fraction:.1%}",
                help=f"Never fired in {card.tokens:,} tokens")
