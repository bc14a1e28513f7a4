"""Plotly figures for the Feature maps page: the map itself and a lineage Sankey."""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative

WIDTH_COLOURS = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
CLUSTER_COLOURS = qualitative.Dark24 + qualitative.Light24


def short(text: str, limit: int = 90) -> str:
    """A label cut to fit a hover box."""
    return text if len(text) <= limit else text[:limit - 1].rstrip() + "…"


def hover_text(points: pd.DataFrame) -> np.ndarray:
    rate = points["firing_rate"].map(lambda r: "firing rate unknown" if pd.isna(r)
                                     else f"firing rate {r:.3%}")
    cluster = points["cluster"].map(lambda c: f"cluster {c}" if c >= 0 else "no cluster")
    tokens = points["top_tokens"].map(lambda t: f"<br>logit lens: {html.escape(t)}" if t else "")
    # labels are user text: plotly renders <a>, <b>, <br> ... in hover text, so escape them
    label = points["label"].map(lambda t: f"<br><i>{html.escape(short(t))}</i>" if t else "")
    return ("<b>" + points["sae"] + " #" + points["latent"].astype(str) + "</b> (width "
            + points["width"].astype(str) + ")<br>" + cluster + " · " + rate + tokens
            + label).to_numpy()


def map_figure(points: pd.DataFrame, colour_by: str = "width",
               chosen: tuple[str, int] | None = None, height: int = 680) -> go.Figure:
    """The map: one marker per latent; ``customdata`` is the row of ``points``.

    By width: one trace per SAE, the widest drawn first so narrow SAEs (larger markers) sit on
    top. By cluster: noise grey underneath, clusters coloured on top.
    """
    points = points.reset_index(drop=True)  # customdata = position in ``points``
    text = hover_text(points)
    rows = np.arange(len(points))
    fig = go.Figure()
    order = points.drop_duplicates("sae").sort_values("width")["sae"].tolist()
    if colour_by == "width":
        for rank in reversed(range(len(order))):
            mask = (points["sae"] == order[rank]).to_numpy()
            fig.add_trace(go.Scattergl(
                x=points["x"][mask], y=points["y"][mask], mode="markers", name=order[rank],
                customdata=rows[mask], hovertext=text[mask], hoverinfo="text",
                marker={"size": 3 + 2.5 * (len(order) - rank), "opacity": 0.75,
                        "color": WIDTH_COLOURS[rank % len(WIDTH_COLOURS)],
                        "line": {"width": 0}},
            ))
    else:
        noise = (points["cluster"] < 0).to_numpy()
        fig.add_trace(go.Scattergl(
            x=points["x"][noise], y=points["y"][noise], mode="markers", name="no cluster",
            customdata=rows[noise], hovertext=text[noise], hoverinfo="text",
            marker={"size": 4, "color": "#c7c7c7", "opacity": 0.5},
        ))
        clustered = points[~noise]
        colours = [CLUSTER_COLOURS[c % len(CLUSTER_COLOURS)] for c in clustered["cluster"]]
        fig.add_trace(go.Scattergl(
            x=clustered["x"], y=clustered["y"], mode="markers", name="clusters",
            customdata=rows[~noise], hovertext=text[~noise], hoverinfo="text",
            marker={"size": 6, "color": colours, "opacity": 0.85},
        ))
    if chosen is not None:
        hit = points[(points["sae"] == chosen[0]) & (points["latent"] == chosen[1])]
        if len(hit):
            fig.add_trace(go.Scattergl(
                x=hit["x"], y=hit["y"], mode="markers", name=f"{chosen[0]} #{chosen[1]}",
                customdata=hit.index.to_numpy(), hovertext=text[hit.index.to_numpy()],
                hoverinfo="text", marker={"size": 18, "symbol": "circle-open",
                                          "color": "black", "line": {"width": 3}},
            ))
    fig.update_layout(
        height=height, margin={"l": 10, "r": 10, "t": 30, "b": 10},
        legend={"itemsizing": "constant", "orientation": "h", "y": 1.04, "x": 0,
                "traceorder": "reversed"},
        xaxis={"showticklabels": False, "title": None, "zeroline": False},
        yaxis={"showticklabels": False, "title": None, "zeroline": False},
        plot_bgcolor="white",
    )
    return fig


def lineage_sankey(tree: pd.DataFrame, root: tuple[str, int]) -> go.Figure:
    """Flows from the chosen latent to its nearest latents in each wider SAE (width: cosine)."""
    nodes = [root] + list(dict.fromkeys(zip(tree["sae"], tree["latent"])))
    where = {node: i for i, node in enumerate(nodes)}
    source = [where[(s, int(i))] for s, i in zip(tree["parent_sae"], tree["parent_latent"])]
    target = [where[(s, int(i))] for s, i in zip(tree["sae"], tree["latent"])]
    fig = go.Figure(go.Sankey(
        arrangement="snap",
        node={"label": [f"{s} #{i}" for s, i in nodes], "pad": 12, "thickness": 14},
        link={"source": source, "target": target, "value": tree["cosine"].clip(lower=0.01),
              "customdata": tree["cosine"],
              "hovertemplate": "decoder cosine %{customdata:.2f}<extra></extra>"},
    ))
    fig.update_layout(height=max(260, 28 * len(nodes)), font={"size": 13, "color": "#222"},
                      margin={"l": 10, "r": 10, "t": 10, "b": 10})
    return fig
