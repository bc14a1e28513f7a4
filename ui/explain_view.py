"""The Lookup page's explanation panel: every stored explanation of a latent, patch scoping,
autointerp (one latent or a batch) and Neuronpedia's import; export of the SAE's explanations.

LLM output, model continuations and imported text are untrusted: every one is shown through
``as_text`` (Markdown) or in a dataframe (plain text)."""

from __future__ import annotations

import os
import time

import pandas as pd
import streamlit as st

from core import autointerp as ai
from core import patch_scoping as ps
from core.feature_index import FeatureIndex
from core.labels import (
    SOURCE_NAMES,
    Explanation,
    best_explanations,
    explanation_table,
    rank,
)
from core.models import LoadedModel
from core.neuronpedia import import_explanations
from core.saes import LoadedSAE
from ui.resources import label_store
from ui.safe_text import as_text

MAX_BATCH_PAGE = 200
"""Latents one autointerp batch from the page may ask for."""


def current_endpoint() -> tuple[ai.Endpoint | None, str]:
    """(endpoint, problem): the sidebar's settings over the environment's; ``None`` and why
    when none is configured or the settings are wrong."""
    s = st.session_state
    base = (s.get("llm_base_url") or "").strip()
    model = (s.get("llm_model") or "").strip()
    key = s.get("llm_key") or ""
    try:
        env = ai.Endpoint.from_env()
        if not base and env is None:
            return None, ("No autointerp endpoint is configured: set its base URL, model and key "
                          "under 'Autointerp endpoint' in the sidebar, or start the server with "
                          "SAE_WORKBENCH_LLM_BASE_URL / _MODEL / _API_KEY (or OPENAI_API_KEY). "
                          "A local OpenAI-compatible server (llama.cpp, vLLM, Ollama) works "
                          "the same way.")
        url = (base or env.base_url).rstrip("/")
        # the operator's key goes only to the operator's endpoint, never to a URL typed here
        own = env is not None and url == env.base_url
        return ai.Endpoint(url, model or (env.model if env else ai.DEFAULT_MODEL),
                           key or (env.api_key if own else "")), ""
    except ValueError as exc:
        return None, str(exc)


def endpoint_settings() -> None:
    """Sidebar fields for the endpoint (kept in this browser session only)."""
    env = None
    try:
        env = ai.Endpoint.from_env()
    except ValueError:
        pass
    with st.expander("Autointerp endpoint"):
        st.text_input("Base URL", key="llm_base_url", max_chars=500,
                      placeholder=env.where if env else "https://api.openai.com/v1")
        st.text_input("Model", key="llm_model", max_chars=200,
                      placeholder=env.model if env else ai.DEFAULT_MODEL)
        st.text_input("API key", key="llm_key", type="password", max_chars=500,
                      placeholder=f"from the environment ({env.masked_key})" if env and
                      env.api_key else "none (a local server may need none)")
        st.caption("Kept in this browser session only; never stored.")


def _made_with(e: Explanation) -> str:
    p = e.params
    if e.source == "patchscope":
        return f"norm {p.get('norm', 0):g} at {p.get('hook', '?')}" + (
            " (chat)" if p.get("chat") else "")
    if e.source in ("autointerp", "neuronpedia"):
        return str(p.get("explainer", "")) + (f" · {p['type']}" if p.get("type") else "")
    return ""


def explanations_frame(items: list[Explanation], fires_on: str) -> pd.DataFrame:
    rows = [(SOURCE_NAMES[e.source], e.text, e.score, _made_with(e),
             time.strftime("%Y-%m-%d %H:%M", time.gmtime(e.created_at)) if e.created_at else "")
            for e in sorted(items, key=rank)]
    if fires_on:
        rows.append((SOURCE_NAMES["tokens"], fires_on, None, "the feature index", ""))
    return pd.DataFrame(rows, columns=["source", "explanation", "detection score", "made with",
                                       "date (UTC)"])


def explanation_panel(lm: LoadedModel, sae: LoadedSAE, index: FeatureIndex, name: str,
                      latent: int, scope: str, fires_on: str) -> None:
    st.subheader("Explanations")
    try:
        stored = label_store().explanations(scope, [latent])
    except ValueError as exc:
        st.warning(as_text(f"Stored explanations are not shown: {exc}"))
        stored = []
    best = best_explanations(stored, {latent: fires_on} if fires_on else {}).get(latent)
    if best is not None:
        st.markdown(f"**Best:** {as_text(best.said)}")
    st.dataframe(explanations_frame(stored, fires_on), hide_index=True, width="stretch",
                 column_config={"detection score": st.column_config.NumberColumn(format="%.2f")})
    tab_ps, tab_ai, tab_np = st.tabs(["Patch scoping", "Autointerp", "Neuronpedia & export"])
    with tab_ps:
        patch_scoping_form(lm, sae, latent, scope)
    with tab_ai:
        autointerp_form(lm, index, name, latent, scope)
    with tab_np:
        neuronpedia_and_export(lm, sae, index, name, scope)


def _hook_choice(lm: LoadedModel, sae: LoadedSAE) -> str:
    n_layers = int(lm.config.num_hidden_layers)
    own_layer = int(sae.hook_name.split(".")[1]) if sae.hook_name.startswith("blocks.") else 0
    site = "hook_resid_post" if sae.hook_name.endswith("hook_resid_post") else "hook_resid_pre"
    c = st.columns(2)
    layer = c[0].number_input("Layer to patch", 0, n_layers - 1, min(own_layer, n_layers - 1),
                              key="lookup_ps_layer",
                              help=f"The SAE reads {sae.hook_name}. Early layers often give "
                              "the model more room to read the patched vector.")
    where = c[1].radio("Site", ["hook_resid_pre", "hook_resid_post"],
                       index=["hook_resid_pre", "hook_resid_post"].index(site),
                       key="lookup_ps_site", horizontal=True)
    return f"blocks.{int(layer)}.{where}"


def _norms(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.replace(";", ",").split(",") if x.strip())
    except ValueError:
        raise ValueError(f"Norms {text!r}: give numbers separated by commas, e.g. 500, 2000, "
                         "8000.") from None


@st.fragment
def patch_scoping_form(lm: LoadedModel, sae: LoadedSAE, latent: int, scope: str) -> None:
    st.caption("The model explains the latent itself: in the prompt, the activation at every "
               "token of the placeholder is replaced by the latent's decoder direction scaled "
               "to each norm (first pass only), and the model's continuation is read. One norm "
               "rarely suits every latent, so several run side by side.")
    preset = st.radio("Prompt", ["base", "chat"], key="lookup_ps_preset", horizontal=True,
                      format_func={"base": "for base models",
                                   "chat": "chat template (instruction-tuned)"}.get)
    prompt, prefix, chat = ps.PROMPTS[preset]
    if st.session_state.get("lookup_ps_seen") != preset:
        st.session_state.lookup_ps_prompt = prompt
        st.session_state.lookup_ps_prefix = prefix
        st.session_state.lookup_ps_seen = preset
    text = st.text_area("Prompt (the placeholder marks where the latent is read)", height=150,
                        key="lookup_ps_prompt")
    c = st.columns([2, 1])
    answer = c[0].text_input("Start of the answer (after the chat template)",
                             key="lookup_ps_prefix", disabled=not chat, max_chars=500)
    placeholder = c[1].text_input("Placeholder", ps.PLACEHOLDER, key="lookup_ps_placeholder",
                                  max_chars=50)
    hook = _hook_choice(lm, sae)
    c = st.columns([2, 1])
    norms_text = c[0].text_input(f"Norms (1 to {ps.MAX_NORMS}, comma-separated)",
                                 key="lookup_ps_norms", max_chars=200,
                                 help="Residual norms differ by model and layer; the typical "
                                 "norm at the patched site is shown below.")
    tokens = c[1].slider("Max new tokens", 1, ps.MAX_SCOPE_TOKENS, 16, key="lookup_ps_tokens")
    try:
        cfg = ps.ScopeConfig(prompt=text, placeholder=placeholder, chat=chat,
                             answer_prefix=answer if chat else "", hook=hook,
                             norms=_norms(norms_text) or (1.0,), max_new_tokens=int(tokens))
        typical = _typical(lm, sae, cfg)
    except ValueError as exc:
        st.error(as_text(str(exc)))
        return
    st.caption(f"Typical activation norm at {hook} on this prompt: {typical:,.4g}.")
    if not norms_text.strip():
        suggest = ", ".join(f"{float(f'{f * typical:.3g}'):g}" for f in (0.5, 1, 2, 4))
        st.button(f"Use {suggest}", key="lookup_ps_suggest",
                  on_click=lambda: st.session_state.update(lookup_ps_norms=suggest))
        return
    if st.button("Run patch scoping", key="lookup_ps_run", type="primary"):
        with st.spinner(f"Generating {len(cfg.norms)} continuations"):
            try:
                res = ps.patch_scope(lm, sae, latent, cfg)
            except ValueError as exc:
                st.error(as_text(str(exc)))
                return
        try:
            label_store().put(scope, ps.as_explanations(res, lm, sae, cfg))
        except ValueError as exc:
            st.warning(as_text(f"Shown but not stored: {exc}"))
        st.session_state.lookup_ps_result = res
    res = st.session_state.get("lookup_ps_result")
    if res is not None and res.latent == latent:
        cols = st.columns(len(res.norms))
        for col, norm, text_out, raw in zip(cols, res.norms, res.texts, res.raw):
            col.markdown(f"**norm {norm:,.4g}**  \n{as_text(text_out or '(nothing)')}",
                         help="Whole continuation: " + as_text(raw))
        st.caption(f"{len(res.positions)} placeholder token(s) patched at {res.hook}; "
                   f"{res.seconds:.1f} s. Stored with the latent's explanations.")


@st.cache_data(show_spinner=False, max_entries=64)
def _typical_cached(model: str, sae_label: str, cfg: ps.ScopeConfig, _lm, _sae) -> float:
    return ps.typical_norm(_lm, _sae, cfg)


def _typical(lm: LoadedModel, sae: LoadedSAE, cfg: ps.ScopeConfig) -> float:
    from dataclasses import replace

    return _typical_cached(lm.name, sae.spec.label, replace(cfg, norms=(1.0,)), lm, sae)


@st.fragment
def autointerp_form(lm: LoadedModel, index: FeatureIndex, name: str, latent: int,
                    scope: str) -> None:
    cfg = ai.AutoInterpConfig()
    st.caption(f"An LLM reads the latent's top {cfg.n_top_ex_for_generation} examples "
               "(activating tokens marked) and writes an explanation; a detection score checks "
               f"it: shown {cfg.n_top_ex_for_scoring} other top examples and "
               f"{cfg.n_random_ex_for_scoring} random windows, unmarked and shuffled, it says "
               "which ones the latent fires on; the score is its accuracy.")
    ep, problem = current_endpoint()
    if ep is None:
        st.info(as_text(problem))
        return
    st.caption(f"Endpoint {as_text(ep.where)} · model {as_text(ep.model)} · key "
               f"{as_text(ep.masked_key)}")
    store = label_store()
    made = ai.params(ep, cfg)
    c = st.columns(2)
    redo = c[1].checkbox("Redo latents already explained this way", key="lookup_ai_redo")
    if c[0].button("Explain and score this latent", key="lookup_ai_one", type="primary"):
        _run_batch(ep, index, name, [latent], lm, cfg, store, scope, redo, 1)
    with st.expander("Many latents"):
        b = st.columns(3)
        how = b[0].radio("Latents", ["most often firing", "listed"], key="lookup_ai_how")
        if how == "listed":
            listed = b[1].text_input("Latent ids, comma-separated", key="lookup_ai_list",
                                     max_chars=8 * MAX_BATCH_PAGE)
            try:
                latents = [index.check_latent(name, int(x)) for x in listed.split(",")
                           if x.strip()]
            except ValueError as exc:
                st.error(as_text(f"{exc} Give latent ids separated by commas."))
                return
        else:
            n = b[1].number_input("How many", 1, MAX_BATCH_PAGE, 20, key="lookup_ai_n")
            table = index.summary(name).sort_values("firing_count", ascending=False)
            latents = [int(i) for i in table["latent"].head(int(n))]
        concurrency = b[2].slider("Requests at once", 1, ai.MAX_CONCURRENCY, 4,
                                  key="lookup_ai_conc")
        latents = latents[:MAX_BATCH_PAGE]
        try:
            have = set() if redo else store.explained(scope, "autointerp", made)
        except ValueError as exc:
            st.warning(as_text(f"Cannot tell which latents are already explained: {exc}"))
            return
        todo = [i for i in latents if i not in have]
        est = ai.estimate(index, name, todo, lm.tokenizer, cfg)
        p = st.columns(2)
        price_in = p[0].number_input("$ per 1M prompt tokens", 0.0, 1000.0,
                                     float(os.environ.get("SAE_WORKBENCH_LLM_PRICE_IN", 0)),
                                     key="lookup_ai_pin")
        price_out = p[1].number_input("$ per 1M completion tokens", 0.0, 1000.0,
                                      float(os.environ.get("SAE_WORKBENCH_LLM_PRICE_OUT", 0)),
                                      key="lookup_ai_pout")
        st.caption(f"{len(latents) - len(todo)} of {len(latents)} already explained this way "
                   f"(kept, not recomputed). To run: {est.latents} latents, {est.requests} "
                   f"requests, about {est.prompt_tokens:,} prompt and "
                   f"{est.completion_tokens:,} completion tokens"
                   + (f", about ${est.dollars(price_in, price_out):,.2f}."
                      if price_in or price_out else " (enter prices for a cost)."))
        if st.button(f"Explain {est.latents} latents", key="lookup_ai_many",
                     disabled=not todo):
            _run_batch(ep, index, name, todo, lm, cfg, store, scope, redo, concurrency)


def _run_batch(ep, index, name, latents, lm, cfg, store, scope, redo, concurrency) -> None:
    bar = st.progress(0.0, text="Asking the endpoint")
    try:
        rep = ai.explain_many(ep, index, name, latents, lm.tokenizer, cfg, store, scope,
                              redo=redo, concurrency=concurrency,
                              progress=lambda i, n, m: bar.progress(i / n, text=f"{i}/{n}: {m}"))
    except ValueError as exc:
        st.error(as_text(str(exc)))
        return
    bar.empty()
    if rep.stopped:
        st.error(as_text(rep.stopped + " Nothing stored was lost."))
    for r in rep.done[:5]:
        st.success(as_text(f"#{r.latent}: {r.explanation} (detection score {r.score:.2f})"
                           if r.score is not None else f"#{r.latent}: {r.explanation}"))
    if rep.skipped:
        st.info(f"{len(rep.skipped)} latent(s) already had an explanation made this way; "
                "tick 'Redo' to ask again.")
    failed = {k: v for k, v in rep.failed.items() if not rep.stopped or v != rep.stopped}
    for latent, why in list(failed.items())[:5]:
        st.warning(as_text(f"#{latent}: {why}"))
    if len(rep.done) > 5:
        st.caption(f"{len(rep.done)} explained in {rep.seconds:.1f} s; "
                   f"{rep.usage.prompt_tokens:,} + {rep.usage.completion_tokens:,} tokens.")


def neuronpedia_and_export(lm: LoadedModel, sae: LoadedSAE, index: FeatureIndex, name: str,
                           scope: str) -> None:
    if sae.neuronpedia_id:
        st.caption(f"Neuronpedia hosts this SAE as {as_text(sae.neuronpedia_id)}; importing "
                   "its explanations needs the internet.")
        if st.button("Import Neuronpedia's explanations", key="lookup_np_import"):
            with st.spinner("Downloading Neuronpedia's explanations"):
                try:
                    stored, skipped = import_explanations(label_store(), scope,
                                                          sae.neuronpedia_id, sae.d_sae)
                except ValueError as exc:
                    st.error(as_text(str(exc)))
                else:
                    st.success(f"Stored {stored:,} explanations ({skipped:,} records skipped).")
    else:
        st.caption("This SAE has no Neuronpedia id (sae_lens releases that Neuronpedia hosts "
                   "do); there is nothing to import.")
    from ui.resources import cached_auto_labels

    if st.button("Prepare export of every explanation of this SAE", key="lookup_exp_prep"):
        auto = cached_auto_labels(str(index.path), index.path.stat().st_mtime, name, index,
                                  lm.tokenizer)
        try:
            table = explanation_table(label_store().explanations(scope), auto)
        except ValueError as exc:
            st.error(as_text(str(exc)))
            return
        c = st.columns(2)
        c[0].download_button("Download CSV", table.to_csv(index=False), key="lookup_exp_csv",
                             file_name=f"{name}-explanations.csv", mime="text/csv")
        c[1].download_button("Download JSON", table.to_json(orient="records", indent=1),
                             key="lookup_exp_json", file_name=f"{name}-explanations.json",
                             mime="application/json")
        st.caption(f"{len(table):,} explanations, every source with its score, parameters and "
                   "date.")
