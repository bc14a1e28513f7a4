"""Feature lookup: one latent's dashboard, search, what fires on a text, SAE health."""

import html
import math
import random

import pandas as pd
import streamlit as st

from core.feature_index import what_fires
from core.labels import LabelStore, search_latents
from ui.lookup_view import activation_histogram, build_index_form, density_figure, examples_html
from ui.resources import index_for, label_store, labels_for
from ui.tokens import TOKEN_CSS, token_label, tokens_html
from ui.state import changed_query_param, current, page_guard, set_query_param

page_guard()
st.title("Feature lookup")
st.markdown(TOKEN_CSS, unsafe_allow_html=True)

lm, sae = current()
if lm is None or sae is None:
    st.info("Load a model and an SAE in the sidebar to browse its latents.")
    st.stop()

found_index = index_for(lm, sae)
if found_index.problem:
    st.error(found_index.problem)
if found_index.index is None:
    build_index_form(lm, sae, found_index.path, found_index.name)
    st.stop()
index, path, name = found_index.index, found_index.path, found_index.name

d_sae = index.d_sae(name)
scope = LabelStore.scope(lm.name, sae.spec.label)
user_labels, auto = labels_for(index, name, lm.tokenizer, scope)


def set_latent(value: int) -> None:
    st.session_state.lookup_latent = value
    set_query_param("latent", str(value), "lookup_qp")


param = changed_query_param("latent", "lookup_qp")
if param is not None:
    try:
        set_latent(index.check_latent(name, int(param)))
    except ValueError as exc:
        st.warning(f"Ignored latent={param!r}: {exc}")
if not 0 <= st.session_state.get("lookup_latent", 0) < d_sae:  # a narrower SAE was loaded
    st.session_state.lookup_latent = 0

st.caption(f"SAE **{sae.spec.label}** · {d_sae:,} latents at `{sae.hook_name}` · index "
           f"`{path.name}` ({int(index.meta['tokens']):,} tokens"
           + (f" of {index.meta['corpus']})" if index.meta.get('corpus') else ")"))

TABS = ["Latent", "Search", "What fires on my text", "SAE health"]
text_param = st.query_params.get("text")
sent_text = changed_query_param("text", "lookup_qp_text")  # a text sent from another page
if sent_text is not None:
    st.session_state.lookup_text = sent_text
    st.session_state.lookup_fired = None
    try:
        st.session_state.lookup_fired = what_fires(lm, sae, sent_text)
    except ValueError as exc:
        st.warning(f"Ignored text in the link: {exc}")
tab_latent, tab_search, tab_fires, tab_health = st.tabs(
    TABS, default=TABS[2] if text_param is not None else None)

with tab_search:
    query = st.text_input("Latent id, or a token / piece of a word", key="lookup_query",
                          placeholder="e.g. 1234, Paris, def")
    if query.strip():
        if query.strip().isdigit():
            try:
                hit = index.check_latent(name, int(query))
                st.page_link("pages/lookup.py", label=f"Open latent #{hit}",
                             query_params={"latent": str(hit)})
            except ValueError as exc:
                st.error(str(exc))
        else:
            try:
                found = search_latents(index, name, query, lm.tokenizer, user_labels, auto)
            except ValueError as exc:
                st.error(str(exc))
            else:
                found.insert(1, "label", [user_labels.get(i) or auto.get(i, "")
                                          for i in found["latent"]])
                st.caption(f"{len(found)} latents whose labels, top logit-lens tokens or top "
                           f"activating tokens contain {query!r}.")
                found["link"] = "?latent=" + found["latent"].astype(str)
                st.dataframe(found, hide_index=True, width="stretch", column_config={
                    "link": st.column_config.LinkColumn("open", display_text="open"),
                    "firing_rate": st.column_config.NumberColumn(format="%.4f"),
                })
                st.download_button("Download results as CSV", found.to_csv(index=False),
                                   file_name=f"{name}-search.csv", mime="text/csv",
                                   key="lookup_csv")

with tab_fires:
    text = st.text_area("Text", key="lookup_text", height=120,
                        placeholder="Type or paste text; every token's top latents show below.")
    if st.button("Analyse", key="lookup_analyse", type="primary"):
        try:
            st.session_state.lookup_fired = what_fires(lm, sae, text)
        except ValueError as exc:
            st.error(str(exc))
            st.session_state.pop("lookup_fired", None)
    fired = st.session_state.get("lookup_fired")
    if fired is not None:
        top = fired.overall[0][1] if fired.overall else 1.0
        st.markdown(tokens_html(lm.tokenizer, fired.tokens,
                                [row[0][1] if row else 0.0 for row in fired.per_token], top),
                    unsafe_allow_html=True)
        st.caption("Colour: the strongest latent's activation at each token.")
        st.markdown("**Strongest latents over the text**")
        lcols = st.columns(5)
        for j, (lat, value, count) in enumerate(fired.overall[:20]):
            lcols[j % 5].page_link("pages/lookup.py", label=f"#{lat} · {value:.1f} ({count}×)",
                                   query_params={"latent": str(lat)})
        rows = [(i, lm.tokenizer.decode([t]), ", ".join(f"#{a} ({v:.1f})" for a, v in row))
                for i, (t, row) in enumerate(zip(fired.tokens, fired.per_token))]
        st.dataframe(pd.DataFrame(rows, columns=["position", "token", "top latents"]),
                     hide_index=True, width="stretch")

with tab_health:
    stats = index.sae_stats(name)
    h = st.columns(5)
    h[0].metric("L0", f"{stats['l0']:.1f}")
    h[1].metric("FVE", f"{stats['fve']:.3f}")
    h[2].metric("Dead latents", f"{stats['dead'] / d_sae:.1%}", help=f"{stats['dead']:,} never fire")
    h[3].metric("Dense (>1 in 10)", f"{stats['dense']:,}")
    h[4].metric("Tokens", f"{stats['tokens']:,}")
    st.plotly_chart(density_figure(stats["log10_density"], title="Firing-rate histogram"),
                    width="stretch")

# The latent tab last: its contexts need a forward pass, the other tabs should not wait for it.
with tab_latent:
    cols = st.columns([2, 1, 1, 1.4])
    latent = cols[0].number_input("Latent", 0, d_sae - 1, key="lookup_latent",
                                  on_change=lambda: set_latent(st.session_state.lookup_latent))
    cols[1].button("◀ Previous", on_click=set_latent, args=(max(latent - 1, 0),),
                   width="stretch", key="lookup_prev")
    cols[2].button("Next ▶", on_click=set_latent, args=(min(latent + 1, d_sae - 1),),
                   width="stretch", key="lookup_next")
    alive = index.alive_latents(name)
    cols[3].button("Random alive latent", width="stretch", key="lookup_random",
                   on_click=lambda: set_latent(random.choice(alive)), disabled=not alive)
    data = index.latent(name, int(latent))
    m = st.columns(5)
    m[0].metric("Firing rate", f"{data.firing_rate:.3%}")
    m[1].metric("Max activation", f"{data.max_act:.2f}")
    m[2].metric("Mean when firing", f"{data.mean_act:.2f}")
    m[3].metric("Times fired", f"{data.firing_count:,}")
    m[4].metric("Encoder·decoder cos", f"{data.enc_dec_cos:.2f}")
    lab_cols = st.columns([3, 2])
    lab_cols[0].markdown(f"**Fires on:** {html.escape(auto.get(data.latent, '—'))}"
                         + (f" · **your label:** {html.escape(user_labels[data.latent])}"
                            if data.latent in user_labels else ""))
    with lab_cols[1].popover("Label this latent", width="stretch"):
        new_label = st.text_input("Label (empty removes it)",
                                  user_labels.get(data.latent, ""),
                                  key=f"lookup_label_{data.latent}")
        if st.button("Save label", key="lookup_label_save"):
            try:
                label_store().set(scope, data.latent, new_label)
            except ValueError as exc:
                st.error(str(exc))
            else:
                st.rerun()
    if sae.neuronpedia_id:
        st.markdown(f"[Open on Neuronpedia](https://www.neuronpedia.org/{sae.neuronpedia_id}/"
                    f"{data.latent})")
    if data.firing_count == 0:
        st.warning("This latent never fired on the indexed corpus (dead here).")
    else:
        left, right = st.columns(2)
        left.plotly_chart(activation_histogram(data), width="stretch")
        stats = index.sae_stats(name)
        mark = math.log10(data.firing_rate)
        right.plotly_chart(density_figure(stats["log10_density"], mark), width="stretch")

    tok = lm.tokenizer
    st.subheader("Logit lens")
    st.caption(index.meta.get("logit_lens", ""))
    lcol, rcol = st.columns(2)
    lcol.dataframe(pd.DataFrame([(token_label(tok, t)[0], v) for t, v in data.logit_pos],
                                columns=["promoted", "logit"]), hide_index=True, width="stretch")
    rcol.dataframe(pd.DataFrame([(token_label(tok, t)[0], v) for t, v in data.logit_neg],
                                columns=["suppressed", "logit"]), hide_index=True,
                   width="stretch")

    st.subheader(f"Top {len(data.top)} activating contexts")
    st.caption("Colour is the activation (hover for values); the outlined token is the one "
               "indexed. ⟨bos⟩ and other special tokens are boxed; BOS never counts as firing.")
    st.markdown("".join(examples_html(lm, sae, index, name, data, data.top)),
                unsafe_allow_html=True)

    if data.intervals:
        st.subheader("Samples from activation intervals")
        by_interval: dict = {}
        for i, lo, hi, ex in data.intervals:
            by_interval.setdefault((i, lo, hi), []).append(ex)
        for (i, lo, hi), exs in by_interval.items():
            with st.expander(f"Interval {i + 1}: activation {lo:.2f} – {hi:.2f} "
                             f"({len(exs)} samples)", expanded=(i == max(by_interval)[0])):
                st.markdown("".join(examples_html(lm, sae, index, name, data, exs)),
                            unsafe_allow_html=True)

    st.subheader("Nearest latents by decoder cosine")
    ncols = st.columns(5)
    for j, (other, cos) in enumerate(data.neighbours):
        ncols[j % 5].page_link("pages/lookup.py", label=f"#{other} · cos {cos:.2f}",
                               query_params={"latent": str(other)})
    st.download_button("Download this latent as JSON", data.to_json(tok),
                       file_name=f"{name}-latent-{data.latent}.json", mime="application/json",
                       key="lookup_json")
