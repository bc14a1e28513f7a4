"""Feature maps (not built yet)."""

import streamlit as st

from ui.state import page_guard

page_guard()

st.title("Feature maps")
st.info(
    'This page is not built yet. It will offer UMAP + HDBSCAN maps of decoder directions across'
    ' SAE widths, with split lineage. The model and SAE you loaded in the sidebar are ready for'
    ' it.'
)
