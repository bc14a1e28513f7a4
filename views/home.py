"""What is loaded, and where to go next."""

import streamlit as st

from core.saes import card_figures
from ui.state import current, held_models, memory_summary, model_pool

st.title("SAE Workbench")
st.caption("Browse SAE latents, steer with them, dream inputs that drive them, map how they split.")

lm, sae = current()
if lm is None:
    st.info("No model is loaded. Pick one in the sidebar and press **Load**.")
    st.caption(f"Models held: {len(held_models())} of {model_pool().capacity}.")
    st.stop()

st.subheader(f"Model: {lm.name}")
cols = st.columns(5)
cols[0].metric("Layers", lm.n_layers)
cols[1].metric("d_model", lm.d_model)
cols[2].metric("Vocabulary", f"{lm.config.vocab_size:,}")
cols[3].metric("Device", lm.device.type)
cols[4].metric("Dtype", str(lm.dtype).removeprefix("torch."))
st.caption(f"{lm.architecture} · loaded in {lm.load_seconds:.1f} s · source: {lm.spec.source}"
           + (f" ({lm.spec.name})" if lm.spec.name else ""))

st.subheader("SAE: " + (sae.spec.label if sae is not None else "none"))
if sae is None:
    st.info("No SAE is loaded. Pick one in the sidebar (embedded family, sae_lens release, "
            "Neuronpedia id or a local directory) and press **Load**.")
else:
    cols = st.columns(4)
    cols[0].metric("Width (d_sae)", f"{sae.d_sae:,}")
    cols[1].metric("Layer", sae.hook_name.split(".")[1])
    cols[2].metric("Architecture", sae.architecture)
    cols[3].metric("d_in", sae.d_in)
    st.markdown(f"Hook point `{sae.hook_name}`")
    processing = []
    if sae.processing.center:
        processing.append("per-token centering (TransformerLens center_writing_weights)")
    processing.append("one BOS prepended" if sae.processing.prepend_bos else "no BOS")
    if sae.sae.cfg.normalize_activations != "none":
        processing.append(f"normalize_activations={sae.sae.cfg.normalize_activations}")
    st.caption("Input processing: " + "; ".join(processing) + f" · trained on {sae.model_name}")
    card = card_figures(sae.spec)
    if card is not None:
        st.caption(f"From the family's card, on {card.tokens:,} held-out tokens: FVE "
                   f"{card.fve:.3f} · L0 {card.l0:.1f} · dead {card.dead_fraction:.1%} · "
                   f"CE {card.ce_increase:+.3f} nats ({card.ce_recovered:.1%} recovered, on "
                   f"{card.ce_tokens:,} tokens). SAE health in Feature lookup has more.")
    if sae.neuronpedia_id:
        st.markdown(f"Neuronpedia: [{sae.neuronpedia_id}]"
                    f"(https://www.neuronpedia.org/{sae.neuronpedia_id})")
    for warning in sae.warnings:
        st.warning(warning)

st.subheader("Memory")
st.table({k: [v] for k, v in memory_summary(lm, sae).items()})
if lm is not None and lm.device.type == "cpu":
    st.caption("Process RSS is what the server holds in RAM now. Weights loaded from a "
               "safetensors file are memory-mapped and read in as they are used, so RSS can sit "
               "below their size until every part has been used.")

held = held_models()
st.subheader("Models held by this server")
st.caption(f"Models held: {len(held)} of {model_pool().capacity} (shared by every session; "
           "`SAE_WORKBENCH_MAX_MODELS` sets the limit, the least recently used goes first). "
           "A link loads only these or the default; anything else waits for **Load**.")
st.dataframe(held, hide_index=True, width="stretch")

st.subheader("Pages")
st.page_link("views/lookup.py", label="Feature lookup: dashboards, search, what fires on my text",
             icon=":material/search:")
st.page_link("views/steering.py", label="Steering: clamp latents, compare generations", icon=":material/tune:")
st.page_link("views/dreaming.py", label="Dreaming: optimize text to drive a latent", icon=":material/auto_awesome:")
st.page_link("views/maps.py", label="Feature maps: UMAP of decoder directions across widths",
             icon=":material/scatter_plot:")
