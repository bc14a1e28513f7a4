"""Feature lookup: one latent's dashboard, search, what fires on a text, SAE health."""

import json
import math
import random

import pandas as pd
import streamlit as st

from core.density import describe, is_dense
from core.feature_index import RANKINGS, strongest, token_tops, window_activations, what_fires
from core.labels import LabelStore, latent_names, search_latents
from core.saes import card_figures
from ui.lookup_view import (
    activation_histogram,
    build_index_form,
    card_metrics,
    density_figure,
    examples_html,
    interval_groups,
    numbers,
)
from ui.explain_view import explanation_panel
from ui.resources import best_said, explanations_for, index_for, label_store, labels_for
from ui.safe_text import as_text
from ui.tokens import TOKEN_CSS, token_label, tokens_html
from ui.state import (
    changed_query_param,
    current,
    link_params,
    link_url,
    set_query_param,
)

st.title("Feature lookup")
st.markdown(TOKEN_CSS, unsafe_allow_html=True)

lm, sae = current()
if lm is None or sae is None:
    st.info("Load a model and an SAE in the sidebar to browse its latents.")
    st.stop()

found_index = index_for(lm, sae)
if found_index.problem:
    st.error(as_text(found_index.problem))
if found_index.index is None:
    build_index_form(lm, sae, found_index.path, found_index.name)
    st.stop()
index, path, name = found_index.index, found_index.path, found_index.name

d_sae = index.d_sae(name)
scope = LabelStore.scope(lm.name, sae.spec)
user_labels, auto = labels_for(index, name, lm.tokenizer, scope)
explained = explanations_for(scope)  # every stored explanation of this SAE, for names and search
best = best_said(explained)
stats = index.sae_stats(name)
counted = int(stats["density_tokens"])  # the tokens firing rates, dead and dense count on
alive = index.alive_latents(name, with_examples=True)


def set_latent(value: int) -> None:
    st.session_state.lookup_latent = value
    set_query_param("latent", str(value), "lookup_qp")


param = changed_query_param("latent", "lookup_qp")
if param is not None:
    try:
        if not param.strip().lstrip("-").isdigit():
            raise ValueError("latent must be a whole number, e.g. latent=12.")
        set_latent(index.check_latent(name, int(param)))
    except ValueError as exc:
        st.warning(as_text(f"Ignored latent={param!r}: {exc}"))
if not 0 <= st.session_state.get("lookup_latent", -1) < d_sae:
    # first visit (or a narrower SAE was loaded): open on a latent that fires
    st.session_state.lookup_latent = alive[0] if alive else 0
set_query_param("latent", str(st.session_state.lookup_latent), "lookup_qp")  # also cleans a bad one

st.caption(f"SAE **{as_text(sae.spec.label)}** · {d_sae:,} latents at `{sae.hook_name}` · index "
           f"`{path.name}` ({int(index.meta['tokens']):,} tokens"
           + (f" of {index.meta['corpus']})" if index.meta.get('corpus') else ")"))

TABS = ["Latent", "Search", "What fires on my text", "SAE health"]
sent_text = changed_query_param("text", "lookup_qp_text")  # a text sent from another page
if sent_text is not None:
    st.session_state.lookup_text = sent_text
    st.session_state.lookup_tab = TABS[2]
    st.session_state.lookup_fired = None
    try:
        st.session_state.lookup_fired = what_fires(lm, sae, sent_text)
    except ValueError as exc:
        st.warning(as_text(f"Ignored text in the link: {exc}"))
# The open tab is in the URL (?lookup_tab=), so it survives other pages, Back and shared links.
tab_latent, tab_search, tab_fires, tab_health = st.tabs(
    TABS, key="lookup_tab", on_change="rerun", bind="query-params")

with tab_search:
    query = st.text_input("Latent id, or a token / piece of a word", key="lookup_query",
                          placeholder="e.g. 1234, Paris, def", persist_state="session")
    if query.strip():
        if query.strip().isdigit():
            try:
                hit = index.check_latent(name, int(query))
                st.page_link("views/lookup.py", label=f"Open latent #{hit}",
                             query_params=link_params(latent=hit))
            except ValueError as exc:
                st.error(str(exc))
        else:
            try:
                found = search_latents(index, name, query, lm.tokenizer, user_labels, auto,
                                       explanations=explained)
            except ValueError as exc:
                st.error(str(exc))
            else:
                if found.empty:
                    st.info(as_text(f"No latent's label, explanation, top logit-lens tokens or "
                                    f"top activating tokens contain {query!r}. Try a shorter "
                                    "piece of a word."))
                else:
                    names = latent_names(index, name, found["latent"], lm.tokenizer,
                                         user_labels, auto, explained=best)
                    found.insert(1, "your label", [names[i].label for i in found["latent"]])
                    found.insert(2, "explanation",
                                 [names[i].explanation for i in found["latent"]])
                    found.insert(3, "fires on", [names[i].fires_on for i in found["latent"]])
                    found.insert(4, "logit lens", [names[i].logit_lens for i in found["latent"]])
                    st.caption(as_text(f"{len(found)} latents whose labels, explanations, top "
                                       f"logit-lens tokens or top activating tokens contain "
                                       f"{query!r}."))
                    found["link"] = [link_url("lookup", latent=i) for i in found["latent"]]
                    st.dataframe(found, hide_index=True, width="stretch", column_config={
                        "link": st.column_config.LinkColumn("open", display_text="open"),
                        "firing_rate": st.column_config.NumberColumn(format="%.4f"),
                        "max_act": st.column_config.NumberColumn(format="%.2f"),
                    })
                    st.download_button("Download results as CSV", found.to_csv(index=False),
                                       file_name=f"{name}-search.csv", mime="text/csv",
                                       key="lookup_csv")

with tab_fires:
    text = st.text_area("Text", key="lookup_text", height=120, persist_state="session",
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
                                [row[0][1] if row else 0.0 for row in fired.active], top),
                    unsafe_allow_html=True)
        st.caption("Colour: the strongest latent's activation at each token.")
        st.markdown("**Strongest latents over the text**")
        rank_cols = st.columns([1.3, 1])
        by = rank_cols[0].radio("Rank by", list(RANKINGS), format_func=RANKINGS.get,
                                key="lookup_rank", horizontal=True, persist_state="session",
                                help="Typical activation: the latent's mean when it fires on the "
                                "indexed corpus. Latents that fire everywhere stop drowning "
                                "the ones this text stands out for.")
        hide_dense = rank_cols[1].checkbox(
            "Hide dense latents", True, key="lookup_hide_dense", persist_state="session",
            help=f"Dense: fires on more than one token in ten (counted on {counted:,} tokens).")
        table = index.summary(name)
        ranked = strongest(fired, table["mean_act"].to_numpy(),
                           is_dense(table["firing_count"].to_numpy(), counted), by, hide_dense)
        named = latent_names(index, name, [r.latent for r in ranked], lm.tokenizer,
                             user_labels, auto, explained=best)
        lcols = st.columns(5)
        n_tokens = len(fired.tokens) - 1
        for j, r in enumerate(ranked):
            typical = ("it never fired in the index, so it has no typical activation"
                       if math.isnan(r.relative) else f"{r.relative:.2f}× its typical activation")
            shown = (f"{r.relative:.1f}× typical" if by == "relative" and not math.isnan(r.relative)
                     else f"{r.value:,.1f}")
            lcols[j % 5].page_link(
                "views/lookup.py", label=f"#{r.latent} · {shown}",
                query_params=link_params(latent=r.latent),
                help=f"Max {r.value:,.1f} on this text, firing on {r.count} of its {n_tokens} "
                f"tokens; {typical}. " + as_text(str(named[r.latent])))
        if not ranked:
            st.caption("Only dense latents fire on this text; untick 'Hide dense latents'.")
        st.markdown("**One latent on the text**")
        if not 0 <= st.session_state.get("lookup_show", -1) < d_sae:
            st.session_state.lookup_show = ranked[0].latent if ranked else 0
        show = st.columns([1, 3])[0].number_input("Latent to show on the text", 0, d_sae - 1,
                                                  key="lookup_show", persist_state="session")
        values = window_activations(lm, sae, [fired.tokens], int(show))[0]
        corpus_top = float(table["max_act"][int(show)] or 0.0)
        st.markdown(tokens_html(lm.tokenizer, fired.tokens, values,
                                max(max(values), corpus_top) or 1.0), unsafe_allow_html=True)
        shown_name = latent_names(index, name, [int(show)], lm.tokenizer, user_labels, auto,
                                  explained=best)
        st.caption(f"#{show} ({as_text(str(shown_name[int(show)]))}): max {max(values):.2f} on "
                   "this text, "
                   f"{corpus_top:.2f} on the indexed corpus; the colour scale tops at the larger.")
        per_token = token_tops(fired, table["mean_act"].to_numpy(),
                               is_dense(table["firing_count"].to_numpy(), counted), by, hide_dense)

        def listed(row) -> str:
            if by == "relative":  # "×?": it never fired in the index
                return ", ".join(f"#{r.latent} ({r.value:.0f}, " + (
                    "×?)" if math.isnan(r.relative) else f"{r.relative:.1f}×)") for r in row)
            return ", ".join(f"#{r.latent} ({r.value:.1f})" for r in row)

        rows = [(i, lm.tokenizer.decode([t]), listed(row))
                for i, (t, row) in enumerate(zip(fired.tokens, per_token))]
        column = ("top latents (activation, × its typical one; ranked by ×" if by == "relative"
                  else "top latents (activation") + (", dense hidden)" if hide_dense else ")")
        st.dataframe(pd.DataFrame(rows, columns=["position", "token", column]),
                     hide_index=True, width="stretch")

with tab_health:
    st.markdown(f"**On the index** ({int(stats['tokens']):,} tokens)")
    h = st.columns(5)
    on_indexed = f"On the {int(stats['tokens']):,} indexed tokens (BOS left out)"
    h[0].metric("L0", f"{stats['l0']:.1f}", help=f"{on_indexed}: latents firing per token")
    h[1].metric("FVE", f"{stats['fve']:.3f}",
                help=f"{on_indexed}: fraction of the hook's variance the reconstruction explains")
    h[2].metric("Dead latents", f"{stats['dead'] / d_sae:.1%}",
                help=f"{stats['dead']:,} never fired in {counted:,} tokens")
    h[3].metric("Dense (>1 in 10)", f"{stats['dense']:,}",
                help=f"Counted on {counted:,} tokens")
    h[4].metric("Tokens indexed", f"{stats['tokens']:,}")
    st.caption(describe(int(stats["dead"]), int(stats["dense"]), d_sae, counted).capitalize()
               + (f" (more text than the {int(stats['tokens']):,} indexed)."
                  if counted != stats["tokens"] else "."))
    card = card_figures(sae.spec)
    if card is not None:
        card_metrics(card)
    st.plotly_chart(density_figure(stats["log10_density"], counted, title="Firing-rate histogram"),
                    width="stretch")

# The latent tab last: its contexts need a forward pass, the other tabs should not wait for it.
with tab_latent:
    cols = st.columns([2, 1, 1, 1.4])
    latent = cols[0].number_input("Latent", 0, d_sae - 1, key="lookup_latent",
                                  on_change=lambda: set_latent(st.session_state.lookup_latent),
                                  persist_state="session")
    cols[1].button("◀ Previous", on_click=set_latent, args=(max(latent - 1, 0),),
                   width="stretch", key="lookup_prev")
    cols[2].button("Next ▶", on_click=set_latent, args=(min(latent + 1, d_sae - 1),),
                   width="stretch", key="lookup_next")
    cols[3].button("Random alive latent", width="stretch", key="lookup_random",
                   on_click=lambda: set_latent(random.choice(alive)), disabled=not alive)
    data = index.latent(name, int(latent))
    m = st.columns(5)
    m[0].metric("Firing rate", f"{data.firing_rate:.3%}", help=f"Counted on {counted:,} tokens")
    m[1].metric("Max activation", f"{data.max_act:.2f}")
    m[2].metric("Mean when firing", f"{data.mean_act:.2f}")
    m[3].metric("Times fired", f"{data.firing_count:,}")
    m[4].metric("Encoder·decoder cos", f"{data.enc_dec_cos:.2f}")
    lab_cols = st.columns([3, 2])
    names = latent_names(index, name, [data.latent], lm.tokenizer, user_labels, auto,
                         explained=best)[data.latent]
    lab_cols[0].markdown(f"**Fires on:** {as_text(names.fires_on or '—')} · "
                         f"**Logit lens:** {as_text(names.logit_lens or '—')}"
                         + (f" · **your label:** {as_text(names.label)}"
                            if names.label else "")
                         + (f"  \n**Explanation:** {as_text(names.explanation)}"
                            if names.explanation else ""),
                         help="Fires on: the tokens its top activating examples sit on (what it "
                         "reads). Logit lens: the tokens its decoder direction promotes (what it "
                         "writes).")
    with lab_cols[1].popover("Label this latent", width="stretch"):
        new_label = st.text_input("Label (empty removes it)",
                                  user_labels.get(data.latent, ""),
                                  key=f"lookup_label_{data.latent}")
        if st.button("Save label", key="lookup_label_save"):
            try:
                label_store().set(scope, data.latent, new_label)
            except ValueError as exc:
                st.error(as_text(str(exc)))
            else:
                st.rerun()
    if sae.neuronpedia_id:
        st.markdown(f"[Open on Neuronpedia](https://www.neuronpedia.org/{sae.neuronpedia_id}/"
                    f"{data.latent})")
    if data.firing_count == 0:
        st.warning(f"This latent never fired in {counted:,} tokens (dead there).")
    else:
        left, right = st.columns(2)
        left.plotly_chart(activation_histogram(data), width="stretch")
        mark = math.log10(data.firing_rate)
        right.plotly_chart(density_figure(stats["log10_density"], counted, mark),
                           width="stretch")

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

    if data.firing_count:
        explanation_panel(lm, sae, index, name, data.latent, scope, names.fires_on)

    if data.intervals:
        st.subheader("Samples from activation intervals")
        n_intervals = int(json.loads(index.meta.get("config", "{}")).get(
            "n_intervals", max(i for i, *_ in data.intervals) + 1))
        groups, empty = interval_groups(data, n_intervals)
        st.caption(f"0 – {data.max_act:.2f} cut into {n_intervals} equal intervals, highest first"
                   + (f"; interval{'s' if len(empty) > 1 else ''} {numbers(empty)} held no "
                      "sampled activation" if empty else "") + ".")
        for j, (i, lo, hi, exs) in enumerate(groups):
            with st.expander(f"Interval {i + 1} of {n_intervals}: activation {lo:.2f} – {hi:.2f}"
                             f" ({len(exs)} samples)", expanded=j == 0):
                st.markdown("".join(examples_html(lm, sae, index, name, data, exs)),
                            unsafe_allow_html=True)

    st.subheader("Nearest latents by decoder cosine")
    ncols = st.columns(5)
    near = latent_names(index, name, [o for o, _ in data.neighbours], lm.tokenizer,
                        user_labels, auto, explained=best)
    for j, (other, cos) in enumerate(data.neighbours):
        ncols[j % 5].page_link("views/lookup.py", label=f"#{other} · cos {cos:.2f}",
                               query_params=link_params(latent=other),
                               help=as_text(str(near.get(int(other), ""))))
    st.download_button("Download this latent as JSON", data.to_json(tok),
                       file_name=f"{name}-latent-{data.latent}.json", mime="application/json",
                       key="lookup_json")
