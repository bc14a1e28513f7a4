"""Steering: clamp SAE latents or add directions, baseline and steered side by side."""

from dataclasses import replace

import streamlit as st

from core.labels import LabelStore, latent_names, search_latents
from core.steering import (
    MAX_NEW_TOKENS,
    POSITIONS,
    GenConfig,
    Intervention,
    Recipe,
    sweep,
)
from core.vectors import example_sets
from ui.resources import best_said, explanations_for, index_for, labels_for, names_of
from ui.safe_text import as_text
from ui.state import changed_query_param, current, link_params, set_query_param
from ui.steering_view import (
    STARTER_PROMPT,
    add_intervention,
    caa_from_pairs,
    cav_from_rows,
    current_recipe,
    generate_panel,
    keep_vector,
    max_act,
    number,
    remove_intervention,
    set_recipe,
    slider_range,
    slider_step,
    starter_for,
    sweep_defaults,
    sweep_figure,
    sweep_table,
    swept_name,
)

st.title("Steering")
lm, sae = current()
if lm is None:
    st.info("Load a model in the sidebar to steer it.")
    st.stop()

index = name = None
if sae is not None:
    found_index = index_for(lm, sae)
    index, name = found_index.index, found_index.name
    if found_index.problem:
        st.warning(as_text(f"Feature index unavailable ({found_index.problem}); slider ranges "
                           "fall back to 0–300."))

# --- session state and links ------------------------------------------------------------------
sae_key = (lm.name, sae.spec.label if sae else None)
if st.session_state.get("steer_for") != sae_key:  # first visit, or another model / SAE
    st.session_state.steer_for = sae_key
    set_recipe(starter_for(lm, sae))
    st.session_state.setdefault("steer_prompt", STARTER_PROMPT)
    st.session_state.pop("steer_out", None)
    st.session_state.pop("steer_stopped", None)
    st.session_state.pop("steer_sweep", None)
recipe_param = changed_query_param("recipe", "steer_qp_recipe")
if recipe_param is not None:
    try:
        set_recipe(Recipe.from_param(recipe_param))
    except ValueError as exc:
        st.warning(as_text(f"Ignored recipe in the link: {exc}"))
prompt_param = changed_query_param("prompt", "steer_qp_prompt")
if prompt_param is not None:
    st.session_state.steer_prompt = prompt_param
st.session_state.setdefault("steer_vectors", {})
# Recipes from a link or a file may lack the index's max activations (slider ranges need them).
st.session_state.steer_items = [
    (uid, iv if iv.kind == "vector" or iv.max_act else
     replace(iv, max_act=max_act(index, name, iv.latent)))
    for uid, iv in st.session_state.steer_items]

st.caption(f"**{as_text(lm.name)}**" + (f" · SAE **{as_text(sae.spec.label)}** at `{sae.hook_name}`"
                               f" ({sae.d_sae:,} latents)" if sae else " · no SAE loaded: "
                               "concept vectors only"))

left, right = st.columns([1.05, 2], gap="large")

# --- the recipe ---------------------------------------------------------------------------------
with left:
    st.subheader("Interventions")
    if not st.session_state.steer_items:
        st.caption("None yet: add a latent or a concept vector below.")
    for uid, iv in st.session_state.steer_items:
        with st.container(border=True):
            top = st.columns([6, 1])
            if iv.kind == "vector":
                top[0].markdown(f"**Add vector** {as_text(iv.vector.name)} at "
                                f"{as_text(iv.vector.hook_name)}")
            else:
                verb = "Clamp" if iv.kind == "clamp" else "Add direction of"
                top[0].page_link("views/lookup.py", label=f"{verb} latent #{iv.latent}",
                                 query_params=link_params(latent=iv.latent))
            top[1].button("", icon=":material/close:", key=f"steer_rm_{uid}",
                          help="Remove this intervention", on_click=remove_intervention,
                          args=(uid,))
            if iv.kind != "vector" and sae is not None and index is not None:
                st.caption(as_text(str(names_of(index, name, lm, sae, [iv.latent])[iv.latent])))
            lo, hi = slider_range(iv)
            st.slider("value" if iv.kind == "clamp" else "α", lo, hi, float(iv.value),
                      step=slider_step(lo, hi),
                      key=f"steer_val_{uid}", persist_state="session",
                      help=(f"Max activation in the index: {iv.max_act:,.1f}" if iv.max_act
                            else "No max activation known for this latent."))
            if iv.kind == "add" and iv.scale_by_max:
                st.caption(f"α is in units of the max activation ({iv.max_act:,.1f}).")

    with st.expander("Add an intervention", expanded=not st.session_state.steer_items):
        kinds = {"clamp": "Clamp an SAE latent", "add": "Add a latent's decoder direction",
                 "vector": "Add a concept vector"}
        kind = st.radio("Kind", list(kinds), format_func=kinds.get, key="steer_new_kind",
                        persist_state="session")
        if kind == "vector":
            vectors = st.session_state.steer_vectors
            if not vectors:
                st.caption("Make a vector in the Concept vectors tab first.")
            else:
                vname = st.selectbox("Vector", list(vectors), key="steer_new_vector")
                if st.button("Add", key="steer_add_vector", type="primary"):
                    add_intervention(Intervention("vector", 1.0, vector=vectors[vname]))
                    st.rerun()
        elif sae is None:
            st.caption("Load an SAE in the sidebar to steer with its latents.")
        else:
            query = st.text_input("Find latents by label, explanation or token (top "
                                  "logit-lens or activating tokens)", key="steer_search",
                                  placeholder="e.g. small, Paris, def", persist_state="session")
            if query.strip() and index is not None:
                scope = LabelStore.scope(lm.name, sae.spec)
                user, auto = labels_for(index, name, lm.tokenizer, scope)
                explained = explanations_for(scope)
                try:
                    found = search_latents(index, name, query, lm.tokenizer, user, auto,
                                           limit=20, explanations=explained).head(20)
                except ValueError as exc:
                    st.error(str(exc))
                else:
                    if found.empty:
                        st.caption("No latent matches.")
                    else:
                        picks = found["latent"].tolist()
                        names = latent_names(index, name, picks, lm.tokenizer, user, auto,
                                             explained=best_said(explained))
                        st.session_state.steer_new_latent = int(st.selectbox(
                            f"{len(picks)} matches (labels first, then strongest)", picks,
                            format_func=lambda i: f"#{i} · {names[i]}",
                            key="steer_pick"))
            if not 0 <= st.session_state.get("steer_new_latent", 0) < sae.d_sae:
                st.session_state.steer_new_latent = 0  # a narrower SAE was loaded
            latent = st.number_input("Latent", 0, sae.d_sae - 1, key="steer_new_latent",
                                     persist_state="session")
            scale = kind == "add" and st.checkbox("α in units of the latent's max activation",
                                                  key="steer_new_scale",
                                                  value=index is not None)
            if st.button("Add", key="steer_add_latent", type="primary"):
                top_act = max_act(index, name, int(latent))
                try:
                    if kind == "clamp":
                        iv = Intervention("clamp", top_act or 10.0, latent=int(latent),
                                          max_act=top_act)
                    else:
                        iv = Intervention("add", 1.0 if scale else (top_act or 10.0),
                                          latent=int(latent), scale_by_max=bool(scale),
                                          max_act=top_act)
                except ValueError as exc:
                    st.error(str(exc))
                else:
                    add_intervention(iv)
                    st.rerun()

    labels = {"all": "every token", "prompt": "prompt only", "generated": "generated tokens only"}
    st.radio("Apply to", POSITIONS, format_func=labels.get, key="steer_positions",
             horizontal=True, persist_state="session")

    recipe = current_recipe()
    try:
        recipe.check(sae, lm)
    except ValueError as exc:
        st.error(as_text(str(exc)))
    set_query_param("recipe", recipe.to_param(), "steer_qp_recipe")
    with st.expander("Save, load or share this recipe"):
        st.download_button("Download recipe (JSON)", recipe.to_json(sae), "recipe.json",
                           mime="application/json", key="steer_download")
        upload = st.file_uploader("Load a recipe (JSON)", type=["json"], key="steer_upload")
        if upload is not None and st.session_state.get("steer_upload_seen") != upload.file_id:
            st.session_state.steer_upload_seen = upload.file_id
            try:
                set_recipe(Recipe.from_json(upload.getvalue()))
            except ValueError as exc:
                st.error(as_text(str(exc)))
            else:
                st.rerun()
        st.caption("This page's URL holds the recipe (`?recipe=`): copy it to share.")
        if st.button("Reset to the starter recipe", key="steer_reset"):
            set_recipe(starter_for(lm, sae))
            st.rerun()

# --- generation, sweep, concept vectors ---------------------------------------------------------
with right:
    st.text_area("Prompt", key="steer_prompt", height=90, persist_state="session")
    set_query_param("prompt", st.session_state.steer_prompt, "steer_qp_prompt")
    cpu = lm.device.type == "cpu"
    with st.expander("Sampling", expanded=False):
        c = st.columns([1.6, 1, 1, 1])
        max_new = c[0].slider(f"Max new tokens (1 to {MAX_NEW_TOKENS})", 1, MAX_NEW_TOKENS,
                              40 if cpu else 96, key="steer_max_new", persist_state="session",
                              help=f"At most {MAX_NEW_TOKENS} new tokens per row.")
        temperature = c[1].number_input("Temperature", 0.0, 5.0, 0.7, 0.1,
                                        key="steer_temperature", help="0 = greedy",
                                        persist_state="session")
        top_p = c[2].number_input("Top-p", 0.01, 1.0, 0.9, 0.05, key="steer_top_p",
                                  persist_state="session")
        seed = c[3].number_input("Seed", 0, 2**31 - 1, 0, key="steer_seed",
                                 persist_state="session")
        has_chat = bool(getattr(lm.tokenizer, "chat_template", None))
        chat = st.toggle("Chat template (instruction-tuned models)", key="steer_chat",
                         value=False, disabled=not has_chat, persist_state="session",
                         help=None if has_chat else "This tokenizer has no chat template.")
    try:
        cfg = GenConfig(int(max_new), float(temperature), float(top_p), int(seed), bool(chat))
    except ValueError as exc:
        st.error(str(exc))
        cfg = None

    tab_gen, tab_sweep, tab_vec = st.tabs(["Generate", "Strength sweep", "Concept vectors"])

    with tab_gen:
        generate_panel(lm, sae, recipe, cfg, index, name)

    with tab_sweep:
        if not recipe.interventions:
            st.info("Add an intervention to sweep its strength.")
        else:
            labels_ = [iv.label for iv in recipe.interventions]
            if st.session_state.get("steer_sweep_pick", 0) >= len(labels_):
                st.session_state.steer_sweep_pick = 0
            pick = st.selectbox("Intervention", range(len(labels_)),
                                format_func=labels_.__getitem__, key="steer_sweep_pick",
                                persist_state="session")
            target = recipe.interventions[pick]
            # From and To follow the intervention they belong to: a new one (or a new max
            # activation) resets them to its own range.
            swept = (st.session_state.steer_items[pick][0], target.kind, target.max_act,
                     target.scale_by_max)
            if st.session_state.get("steer_sweep_for") != swept:
                st.session_state.steer_sweep_for = swept
                st.session_state.steer_sweep_lo, st.session_state.steer_sweep_hi = (
                    sweep_defaults(target))
            s = st.columns(3)
            s_lo = s[0].number_input("From", key="steer_sweep_lo", persist_state="session")
            s_hi = s[1].number_input("To", key="steer_sweep_hi", persist_state="session")
            n = s[2].number_input("Strengths", 2, 16, 5 if cpu else 9, key="steer_sweep_n",
                                  persist_state="session")
            top_act = target.max_act
            st.caption(f"Sweeps the {swept_name(target)} from {number(s_lo)} to {number(s_hi)}"
                       + (f" ({s_lo / top_act:.2g}× to {s_hi / top_act:.2g}× its max activation "
                          f"{number(top_act)})" if top_act and target.kind != "vector"
                          and not target.scale_by_max else "") + ".")
            if st.button("Run sweep", type="primary", key="steer_sweep_run", disabled=cfg is None):
                strengths = [s_lo + (s_hi - s_lo) * i / (n - 1) for i in range(int(n))]
                try:
                    with st.spinner(f"Generating {int(n) + 1} rows in one batch"):
                        st.session_state.steer_sweep = (
                            target,
                            sweep(lm, sae, st.session_state.steer_prompt, recipe, pick,
                                  strengths, cfg))
                except ValueError as exc:
                    st.error(str(exc))
            done = st.session_state.get("steer_sweep")
            if done:
                swept_iv, sw = done
                st.plotly_chart(sweep_figure(sw, swept_iv), width="stretch")
                st.dataframe(sweep_table(sw), hide_index=True, width="stretch", column_config={
                    "target after": st.column_config.NumberColumn(format="%.2f"),
                    "KL": st.column_config.NumberColumn(format="%.4f")})
                st.caption(f"Baseline: {sw.baseline}")

    with tab_vec:
        hook = sae.hook_name if sae else st.text_input(
            "Hook", f"blocks.{lm.n_layers // 2}.hook_resid_post", key="steer_vec_hook")
        st.markdown("**CAV**: a LinearSVC on the mean activation of labelled texts.")
        sets = example_sets()
        source = st.radio("Rows", ["Example set", "Paste CSV", "Upload CSV"], horizontal=True,
                          key="steer_cav_source")
        raw = None
        if source == "Example set" and sets:
            pick_set = st.selectbox("Set", list(sets), key="steer_cav_set")
            raw = sets[pick_set]
        elif source == "Paste CSV":
            raw = st.text_area("text,label rows", key="steer_cav_csv", height=100,
                               placeholder='text,label\n"I love it",positive\n"I hate it",negative')
        else:
            up = st.file_uploader("CSV with text,label columns", type=["csv"], key="steer_cav_up")
            raw = up.getvalue() if up is not None else None
        positive = st.text_input("Positive label", "positive", key="steer_cav_label")
        if st.button("Train CAV", key="steer_cav_train"):
            keep_vector(lambda: cav_from_rows(lm, hook, raw, positive),
                        lambda v: f"{v.name}: cross-validated accuracy "
                        f"{v.info['cv_accuracy']:.0%} on {v.info['texts']} texts.")
        st.markdown("**CAA**: the mean activation difference of contrast pairs (last token).")
        pairs_text = st.text_area("One pair per line: positive | negative", key="steer_caa_pairs",
                                  placeholder="I love this | I hate this\nWonderful | Terrible")
        if st.button("Make CAA vector", key="steer_caa_make"):
            keep_vector(lambda: caa_from_pairs(lm, hook, pairs_text),
                        lambda v: f"{v.name}: {v.info['pairs']} pairs, norm {v.info['norm']:.1f} "
                        f"(mean activation norm {v.info['mean_norm']:.1f}).")
        for vname, vec in st.session_state.steer_vectors.items():
            row = st.columns([3, 1])
            row[0].markdown(f"{as_text(vname)} · {vec.kind} at {as_text(vec.hook_name)}")
            if row[1].button("Add to recipe", key=f"steer_vec_add_{vname}"):
                add_intervention(Intervention("vector", 1.0, vector=vec))
                st.rerun()
