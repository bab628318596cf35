"""The Streamlit dashboard: one page per stage, reading nothing but run folders.

`app.py` is the entry point; `run_data.py` loads a run folder (cached), `stage_gate.py` says when a
stage's page can be drawn, and each `*_page.py` answers one question about one stage.
"""
