"""Feature lookup (not built yet)."""

import streamlit as st

from ui.state import page_guard

page_guard()

st.title("Feature lookup")
st.info(
    "This page is not built yet. It will offer per-latent dashboards from a feature index "
    "(top activating contexts, logit tables, activation histograms), search by id, token or "
    "label, and 'what fires on my text'. The model and SAE you loaded in the sidebar are ready "
    "for it."
)
