"""Feature maps: UMAP + HDBSCAN of decoder directions across SAE widths, with split lineage."""

import os

import pandas as pd
import streamlit as st

from core.density import is_dead
from core.labels import LabelStore, best_explanations
from core.feature_index import EMBEDDED_INDEX
from core.maps import (
    MAX_LATENTS,
    FeatureMap,
    MapConfig,
    Member,
    attach_labels,
    check_family,
    cluster_table,
    compute_map,
    embedded_family,
    family_key,
    lineage_tree,
    member_from_sae,
    parents,
    release_siblings,
)
from core.map_store import load_map, save_map
from core.models import EMBEDDED_MODEL_NAME, embedded_ready, embedded_tokenizer
from core.saes import embedded_saes, parse_sae_param, sae_param
from ui.maps_view import lineage_sankey, map_figure
from ui.resources import explanations_for, index_at, index_for, labels_for
from ui.safe_text import as_text
from ui.state import current, get_sae, link_params

st.title("Feature maps")
st.caption("Every decoder direction of a family of SAEs on one hook, laid out by UMAP (cosine); "
           "clusters from HDBSCAN on a 10-D UMAP; lineage follows a narrow latent into its "
           "nearest latents of the next wider SAE (feature splitting).")
lm, sae = current()
shipped = embedded_saes()
on_embedded = lm is None or lm.name == EMBEDDED_MODEL_NAME
env_family = os.environ.get("SAE_WORKBENCH_MAP_FAMILY", "")
SOURCES = {"embedded": "Embedded family", "list": "SAEs I list"}
if "map_source" not in st.session_state:
    st.session_state.map_source = "embedded" if shipped and on_embedded and not env_family \
        else "list"
    st.session_state.map_family = "\n".join(
        p.strip() for p in env_family.replace(",", "\n").splitlines() if p.strip()
    ) or (sae_param(sae.spec) if sae is not None else "")


@st.cache_resource(show_spinner="Reading the embedded SAEs", max_entries=8)
def embedded_members(widths: tuple[str, ...], hover: bool, tok_key: str,
                     _tokenizer) -> dict[str, Member]:
    return embedded_family(list(widths), _tokenizer) if hover else embedded_family(
        list(widths), hover=False)


@st.cache_resource(show_spinner=False, max_entries=16)
def clusters_of(map_id: str, _fm: FeatureMap) -> pd.DataFrame:
    return cluster_table(_fm)


def listed_members(lines: list[str], hover: bool) -> dict[str, Member]:
    if lm is None:
        raise ValueError("Load a model in the sidebar first: listed SAEs load onto it.")
    family = {}
    for line in lines:
        spec = parse_sae_param(line)
        if spec is None:
            raise ValueError("'none' is not an SAE; remove that line.")
        loaded = get_sae(spec, lm)
        name = spec.label if spec.label not in family else f"{spec.label} ({len(family)})"
        family[name] = member_from_sae(name, loaded, lm if hover else None)
    return family


def build_family(hover: bool) -> dict[str, Member]:
    if st.session_state.map_source == "embedded":
        tok = None
        if hover:
            tok = lm.tokenizer if lm is not None and lm.name == EMBEDDED_MODEL_NAME else (
                embedded_tokenizer() if embedded_ready() else None)
        return embedded_members(tuple(st.session_state.map_widths), hover,
                                "ids" if tok is None else "tokens", _tokenizer=tok)
    lines = [x.strip() for x in st.session_state.map_family.splitlines() if x.strip()]
    return listed_members(lines, hover)


def with_labels(fm: FeatureMap) -> tuple[pd.DataFrame, dict[str, int]]:
    """The map's points with each latent's best explanation (your label, else the best-scored
    autointerp one, Neuronpedia's, patch scoping's, else the tokens it fires on) where the
    member has a feature index on the loaded model, and the tokens each such member's firing
    rates (so dead and dense) were counted on."""
    if lm is None:
        return fm.points, {}
    labels, counted = {}, {}
    for m in fm.members:
        spec = parse_sae_param(m["spec"]) if m["spec"] else None
        if spec is None or (spec.source == "embedded" and lm.name != EMBEDDED_MODEL_NAME):
            continue
        if spec.source == "embedded":
            found = index_at(EMBEDDED_INDEX, spec.name)  # no need to load the SAE
        else:
            try:
                found = index_for(lm, get_sae(spec, lm))
            except (ValueError, FileNotFoundError, OSError):
                continue
        if found.problem:
            st.warning(as_text(f"No labels for {m['name']}: {found.problem}"))
        if found.index is None:
            continue
        scope = LabelStore.scope(lm.name, spec)
        _, auto = labels_for(found.index, found.name, lm.tokenizer, scope)
        # the best explanation of each latent, as ARENA's map shows its autointerp one
        labels[m["name"]] = {i: e.said for i, e in best_explanations(
            explanations_for(scope), auto).items()}
        counted[m["name"]] = int(found.index.sae_stats(found.name)["density_tokens"])
    return attach_labels(fm.points, labels), counted


def open_in_lookup(fm: FeatureMap, name: str, latent: int) -> None:
    """Lookup shows the sidebar's SAE; ``sae=`` in the link switches it to this latent's SAE."""
    spec = next(m["spec"] for m in fm.members if m["name"] == name)
    if not spec:
        st.warning(f"{name} was given as bare weights; no SAE to open in Lookup.")
        return
    if spec.startswith("embedded:") and lm is not None and lm.name != EMBEDDED_MODEL_NAME:
        st.warning(f"{name} belongs to the embedded model: load it in the sidebar to open "
                   "its latents in Lookup.")
        return
    st.switch_page("views/lookup.py", query_params=link_params(sae=spec, latent=latent))


s = st.session_state
left, right = st.columns([3, 2])
left.radio("Family", list(SOURCES), format_func=SOURCES.get, key="map_source", horizontal=True,
           disabled=not shipped, persist_state="session")
if st.session_state.map_source == "embedded":
    st.session_state.setdefault("map_widths", shipped)
    left.multiselect("Widths", shipped, key="map_widths", persist_state="session")
else:
    left.text_area("SAEs of the family, one per line: `local:<dir>`, `release:<release>/<id>`, "
                   "`embedded:<name>`, `np:<id>`", key="map_family", height=110,
                   persist_state="session",
                   help="All on the same hook and model; they load onto the sidebar's model.")
    if sae is not None and sae.spec.source == "release":
        release = sae.spec.name
        siblings = release_siblings(release, sae.spec.sae_id)
        if len(siblings) > 1:
            left.button(f"List the {len(siblings)} widths of {release} at this site",
                        key="map_siblings", on_click=lambda: s.update(map_family="\n".join(
                            f"release:{release}/{i}" for i in siblings)),
                        help="Each downloads on first use; remove the widest lines to keep "
                        f"the map under {MAX_LATENTS:,} latents.")
D = MapConfig()
KEEP = {"persist_state": "session"}  # the parameters survive visits to other pages
with right.expander("Parameters (UMAP, HDBSCAN, lineage)"):
    p = st.columns(3)
    p[0].number_input("n_neighbors", 2, 200, D.n_neighbors, key="map_n_neighbors", **KEEP)
    p[1].number_input("min_dist (map)", 0.0, 1.0, D.min_dist, 0.01, key="map_min_dist", **KEEP)
    p[2].number_input("lineage k", 1, 20, D.lineage_k, key="map_lineage_k", **KEEP)
    p[0].checkbox("Cluster (HDBSCAN)", D.cluster, key="map_cluster", **KEEP)
    p[1].number_input("min_dist (clusters)", 0.0, 1.0, D.cluster_min_dist, 0.01,
                      key="map_cluster_min_dist", **KEEP)
    p[2].number_input("cluster dims", 2, 50, D.cluster_dims, key="map_cluster_dims", **KEEP)
    p[0].number_input("min_cluster_size", 2, 500, D.min_cluster_size, key="map_min_cluster",
                      **KEEP)
    p[1].number_input("UMAP epochs", 0, 2000, D.n_epochs or 0, 50, key="map_epochs",
                      help="0: UMAP's rule (500 below 10,000 points, 200 above). 200 keeps 97% "
                      "of the 500-epoch neighbour recall at 2.5× the speed.", **KEEP)
    p[2].number_input("seed", 0, 2**31 - 1, D.seed, key="map_seed", **KEEP)

try:
    cfg = MapConfig(n_neighbors=int(s.map_n_neighbors), min_dist=float(s.map_min_dist),
                    cluster=bool(s.map_cluster), cluster_dims=int(s.map_cluster_dims),
                    cluster_min_dist=float(s.map_cluster_min_dist),
                    min_cluster_size=int(s.map_min_cluster), lineage_k=int(s.map_lineage_k),
                    n_epochs=int(s.map_epochs) or None, seed=int(s.map_seed))
    members = check_family(build_family(hover=False))
except (ValueError, FileNotFoundError, OSError) as exc:
    st.error(str(exc))
    st.stop()

fm = load_map(members, cfg)
fresh = s.get("map_fresh")
if fm is None and fresh is not None and fresh.family_key == family_key(members):
    fm = fresh if fresh.config == cfg else None  # computed here but could not be stored
if fm is None:
    n = sum(m.d_sae for m in members)
    st.info(f"No stored map of these {len(members)} SAEs ({n:,} latents) with these parameters."
            f" Computing takes about {max(3, round(n / 7680 * 25))} s on a 2-core CPU; it is "
            "stored, so the next view loads at once.")
    go = s.pop("map_go", False)  # set by the click; gone if this run is interrupted
    st.button("Compute map", key="map_compute", type="primary", disabled=go,
              on_click=lambda: s.update(map_go=True))
    if not go:
        st.stop()
    with st.status(f"Computing the map of {n:,} latents", expanded=True) as status:
        bar = st.progress(0.0)

        def report(fraction: float, message: str) -> None:
            bar.progress(min(max(fraction, 0.0), 1.0), text=message)

        try:
            s.map_fresh = compute_map(build_family(hover=True), cfg, report)
        except (ValueError, FileNotFoundError, OSError) as exc:
            status.update(label="The map could not be computed", state="error")
            st.error(str(exc))
            st.stop()
        try:
            save_map(s.map_fresh)
        except (ValueError, OSError) as exc:
            st.warning(f"The map is shown but not stored: {exc}")
            st.stop()
    st.rerun()

pts, counted = with_labels(fm)
names = [m["name"] for m in fm.members]
if fm.source == "computed":
    where = f"computed in {fm.seconds:.1f} s, not stored"
else:
    where = ("stored in the shipped index" if fm.source.endswith("embedded.duckdb")
             else "loaded from the cache") + f" (computed in {fm.seconds:.1f} s)"
summary = st.empty()  # written once the filter below says which latents are shown
# Colour, click and the dead-latent filter are in the URL (?map_colour=, ?map_click=,
# ?map_hide_dead=) when they differ from the defaults.
if len(names) == 1:
    st.info("One SAE: a map without lineage. Add a wider SAE on the same hook to see splitting.")

c = st.columns([1, 1, 2])
colour = c[0].radio("Colour by", ["width", "cluster"], key="map_colour", horizontal=True,
                    disabled=not fm.config.cluster, bind="query-params")
click = c[1].radio("Clicking a point", ["opens Lookup", "shows lineage"], key="map_click",
                   horizontal=True, bind="query-params")
dead_mask = is_dead(pts["firing_rate"])  # NaN (no index): unknown, never hidden
dead = int(dead_mask.sum())
tokens_said = " or ".join(f"{t:,}" for t in sorted(set(counted.values()))) or "the indexed"
hide = c[2].checkbox(f"Hide the {dead:,} dead latents", True, key="map_hide_dead",
                     disabled=not dead, bind="query-params",
                     help=f"Latents that never fired in {tokens_said} tokens. Their decoder "
                     "directions stay near their initialisation and gather in blobs of their "
                     "own width.")
shown = pts[~dead_mask] if hide and dead else pts
summary.caption(
    (f"{len(shown):,} of {len(pts):,} latents (the {dead:,} dead ones hidden: never fired in "
     f"{tokens_said} tokens)" if len(shown) < len(pts) else f"{len(pts):,} latents")
    + f" from {', '.join(names)} · {where}"
    + (f" · {shown.loc[shown['cluster'] >= 0, 'cluster'].nunique():,} clusters, "
       f"{(shown['cluster'] < 0).mean():.0%} unclustered" if fm.config.cluster and len(shown)
       else ""))
# The chart's identity follows its figure: set the highlighted latent before the first draw,
# or the first click's rerun draws another figure and its selection is lost.
if s.get("map_lin_sae") not in names:
    s.map_lin_sae = names[0]
if "map_lin_latent" not in s:  # start the lineage on a latent that fires
    first = shown.loc[shown["sae"] == s.map_lin_sae, "latent"]
    s.map_lin_latent = int(first.min()) if len(first) else 0
chosen = (s.map_lin_sae, s.map_lin_latent)
event = st.plotly_chart(map_figure(shown, colour if fm.config.cluster else "width",
                                   chosen),
                        on_select="rerun", selection_mode="points", key="map_chart")
picked = event.selection.points if event is not None else []
if not picked:
    s.pop("map_last_pick", None)  # so clicking the same point again acts again
if picked and picked != s.get("map_last_pick"):
    s.map_last_pick = picked
    data = picked[0].get("customdata")
    row = shown.iloc[int(data[0] if isinstance(data, list) else data)]
    if click == "opens Lookup":
        open_in_lookup(fm, row["sae"], int(row["latent"]))
    else:
        s.map_lin_sae, s.map_lin_latent = row["sae"], int(row["latent"])
        st.rerun()  # draw the ring on the new latent

tab_lineage, tab_clusters, tab_latents = st.tabs(["Lineage", "Clusters", "All latents"])
with tab_lineage:
    cols = st.columns([1, 1, 1, 1])
    lin_sae = cols[0].selectbox("SAE", names, key="map_lin_sae", persist_state="session")
    d_sae = next(m["d_sae"] for m in fm.members if m["name"] == lin_sae)
    if not 0 <= s.get("map_lin_latent", 0) < d_sae:
        s.map_lin_latent = 0
    latent = int(cols[1].number_input("Latent", 0, d_sae - 1, key="map_lin_latent",
                                      persist_state="session"))
    min_cos = cols[2].slider("Min decoder cosine", 0.0, 1.0, 0.3, 0.05, key="map_lin_min", **KEEP)
    k = int(cols[3].number_input("Children per latent", 1, fm.config.lineage_k,
                                 min(2, fm.config.lineage_k), key="map_lin_k", **KEEP))
    me = pts[(pts["sae"] == lin_sae) & (pts["latent"] == latent)].iloc[0]
    st.markdown(f"**{as_text(lin_sae)} #{latent}** · cluster "
                f"{me['cluster'] if me['cluster'] >= 0 else '–'}"
                f" · logit lens: {as_text(me['top_tokens'] or 'unknown')}"
                + (f" · {as_text(me['label'])}" if me["label"] else ""))
    if st.button(f"Open {lin_sae} #{latent} in Lookup", key="map_open"):
        open_in_lookup(fm, lin_sae, latent)
    tree = lineage_tree(fm, lin_sae, latent, min_cos, k)
    up = parents(fm, lin_sae, latent)
    if len(up):
        st.caption("Narrower latents that split into this one: " + ", ".join(
            f"{r.sae} #{r.latent} (cos {r.cosine:.2f})" for r in up.itertuples()))
    if tree.empty:
        st.caption("No descendants above the minimum cosine" if lin_sae != names[-1] else
                   "The widest SAE of the family has no descendants.")
    else:
        described = tree.merge(pts[["sae", "latent", "label", "top_tokens", "firing_rate",
                                    "cluster"]],
                               on=["sae", "latent"], how="left")
        described = described.rename(columns={"label": "best explanation"})
        st.dataframe(described, hide_index=True, width="stretch", column_config={
            "cosine": st.column_config.NumberColumn(format="%.3f"),
            "firing_rate": st.column_config.NumberColumn(format="%.4f")})
        st.plotly_chart(lineage_sankey(tree, (lin_sae, latent)), key="map_sankey")

with tab_clusters:
    if not fm.config.cluster:
        st.info("Clustering is off for this map: tick 'Cluster (HDBSCAN)' in the parameters.")
    else:
        table = clusters_of(fm.map_id, fm)
        if st.checkbox("Only clusters spanning several widths", True, key="map_multi", **KEEP):
            table = table[table["n_widths"] > 1]
        st.caption(f"{len(table):,} clusters; common tokens count each latent's top "
                   "logit-lens tokens.")
        st.dataframe(table, hide_index=True, width="stretch", column_config={
            "mean_firing_rate": st.column_config.NumberColumn(format="%.4f")})

with tab_latents:
    st.dataframe(pd.DataFrame(pts), hide_index=True, width="stretch")
    st.download_button("Download points as CSV", pts.to_csv(index=False), key="map_csv",
                       file_name=f"map-{fm.map_id}.csv", mime="text/csv")
