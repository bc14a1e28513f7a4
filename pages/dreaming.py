"""Dreaming (not built yet)."""

import streamlit as st

from ui.state import page_guard

page_guard()

st.title("Dreaming")
st.info(
    'This page is not built yet. It will offer EPO-style token optimization that drives a '
    'latent up, with live convergence plots. The model and SAE you loaded in the sidebar are '
    'ready for it.'
)
