"""SAE Workbench: router and shared sidebar. Run with `./scripts/run` (see README)."""

import logging

import streamlit as st

from ui.safe_text import as_text
from ui.sidebar import render_sidebar
from ui.state import (
    app_pages,
    follow_link,
    init_state,
    load_current,
    mirror_to_query,
    password_gate,
)

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

st.set_page_config(page_title="SAE Workbench", page_icon=":material/biotech:", layout="wide")
password_gate()
page = st.navigation(app_pages())  # first, so the menu shows while a model loads
init_state()
follow_link()
for notice in st.session_state.pop("notices", []):
    st.warning(as_text(notice))
load_current()
mirror_to_query(st.session_state.choice)
for error in st.session_state.load_errors:
    st.error(as_text(error))
if st.session_state.get("waiting"):
    st.info(as_text(f"This link asks for {' and '.join(st.session_state.waiting)}, which the "
                    "server has not loaded. Press Load in the sidebar to load it."))

render_sidebar()
page.run()
