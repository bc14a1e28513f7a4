"""SAE Workbench: router and shared sidebar. Run with `./scripts/run` (see README)."""

import logging

import streamlit as st

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
init_state()
follow_link()
for notice in st.session_state.pop("notices", []):
    st.warning(notice)
load_current()
mirror_to_query(st.session_state.choice)
for error in st.session_state.load_errors:
    st.error(error)

page = st.navigation(app_pages())
render_sidebar()
st.session_state._shell_ran = True  # the page's page_guard() sees that it runs inside the router
page.run()
