"""Model, SAE and hook logic for SAE Workbench. Never imports streamlit."""
