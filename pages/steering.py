"""Steering (not built yet)."""

import streamlit as st

from ui.state import page_guard

page_guard()

st.title("Steering")
st.info(
    'This page is not built yet. It will offer SAE clamping, decoder-direction and concept-'
    'vector steering with baseline and steered generations side by side, plus strength sweeps. '
    'The model and SAE you loaded in the sidebar are ready for it.'
)
