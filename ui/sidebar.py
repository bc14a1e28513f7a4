"""The shared sidebar: pick a model, an SAE and a device; Load applies and updates the URL."""

from __future__ import annotations

import streamlit as st

from core.models import ModelSpec
from core.saes import SaeSpec, all_releases, embedded_saes, release_sae_ids, releases_for_model
from ui.explain_view import endpoint_settings
from ui.state import (
    DEVICES,
    DTYPES,
    MODEL_SOURCES,
    SAE_SOURCES,
    Choice,
    approve,
    current,
    mirror_to_query,
)


def _seed_widgets(choice: Choice) -> None:
    """Point the picker widgets at ``choice`` (once per session, and after each Load)."""
    sae = choice.sae
    st.session_state.pick_model_source = choice.model.source
    st.session_state.pick_model_name = choice.model.name
    st.session_state.pick_device = choice.model.device
    st.session_state.pick_dtype = choice.model.dtype
    st.session_state.pick_sae_source = "none" if sae is None else sae.source
    if sae is not None:
        st.session_state[f"pick_sae_{sae.source}"] = sae.name
        if sae.source == "release":
            st.session_state.pick_sae_id = sae.sae_id


def _sae_picker(model_name: str) -> SaeSpec | None:
    source = st.radio("SAE source", list(SAE_SOURCES), format_func=SAE_SOURCES.get,
                      key="pick_sae_source")
    if source == "none":
        return None
    if source == "embedded":
        shipped = embedded_saes()
        if not shipped:
            st.caption("No SAE family is shipped in data/saes yet. Pick a local directory or, "
                       "online, an sae_lens release.")
            return None
        if st.session_state.get("pick_sae_embedded") not in shipped:
            st.session_state.pick_sae_embedded = shipped[-1]
        name = st.selectbox("Embedded SAE", shipped, key="pick_sae_embedded")
        return SaeSpec("embedded", name)
    if source == "release":
        show_all = st.checkbox("All releases", key="pick_all_releases",
                               help="By default only releases trained on the loaded model.")
        releases = all_releases() if show_all else releases_for_model(model_name)
        if not releases:
            st.caption(f"sae_lens lists no release for {model_name}; tick 'All releases'.")
            return None
        if st.session_state.get("pick_sae_release") not in releases:
            st.session_state.pick_sae_release = releases[0]
        release = st.selectbox("Release", releases, key="pick_sae_release")
        ids = release_sae_ids(release)
        if st.session_state.get("pick_sae_id") not in ids:
            st.session_state.pick_sae_id = ids[0]
        sae_id = st.selectbox("SAE id", ids, key="pick_sae_id")
        st.caption("Downloads from the hub on first use; offline, cached releases only.")
        return SaeSpec("release", release, sae_id)
    label = "Neuronpedia id (e.g. gpt2-small/8-res-jb)" if source == "neuronpedia" else (
        "sae_lens directory (cfg.json + sae_weights.safetensors)"
    )
    name = st.text_input(label, key=f"pick_sae_{source}")
    return SaeSpec(source, name.strip()) if name.strip() else None


def render_sidebar() -> None:
    choice: Choice = st.session_state.choice
    if not st.session_state.get("picker_seeded"):
        _seed_widgets(choice)
        st.session_state.picker_seeded = True
    lm, sae = current()
    with st.sidebar:
        st.subheader("Model")
        source = st.radio("Model source", list(MODEL_SOURCES), format_func=MODEL_SOURCES.get,
                          key="pick_model_source", horizontal=True)
        if source == "hub":
            st.text_input("Hub id", key="pick_model_name", placeholder="gpt2, google/gemma-2-2b")
        elif source == "local":
            st.text_input("Directory (save_pretrained layout)", key="pick_model_name")
        col1, col2 = st.columns(2)
        col1.selectbox("Device", DEVICES, key="pick_device")
        col2.selectbox("Dtype", DTYPES, key="pick_dtype")
        st.subheader("SAE")
        model_name = lm.name if lm is not None else choice.model.label
        try:
            sae_spec = _sae_picker(model_name)
        except ValueError as exc:
            st.error(str(exc))
            sae_spec = None
        if st.button("Load", type="primary", width="stretch", key="pick_load"):
            try:
                name = "" if source == "embedded" else st.session_state.pick_model_name.strip()
                model_spec = ModelSpec(source, name, device=st.session_state.pick_device,
                                       dtype=st.session_state.pick_dtype)
            except ValueError as exc:
                st.error(str(exc))
            else:
                approve(Choice(model_spec, sae_spec))
                mirror_to_query(st.session_state.choice)
                st.rerun()
        if lm is not None:
            st.caption(f"Loaded: **{lm.name}** on {lm.device.type} ({str(lm.dtype)[6:]})"
                       + (f" · SAE **{sae.spec.label}**" if sae is not None else " · no SAE"))
        endpoint_settings()
