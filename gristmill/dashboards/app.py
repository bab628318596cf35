"""The gristmill dashboard: one page per stage of a run, read from the run folder alone.

Start it with `gristmill dashboard RUN_DIR` or `streamlit run gristmill/dashboards/app.py -- --run
RUN_DIR`; without `--run` it reads `$GRISTMILL_RUN`. RUN_DIR is one run folder (`runs/<name>`) or
a folder of runs, in which case the sidebar chooses among them. The page and run are mirrored in
the URL (`?page=filters&run=quickstart`), so a page can be linked to or opened headless.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from pathlib import Path

import streamlit as st

from gristmill.dashboards import (
    ablations_page,
    classify_page,
    crawl_page,
    dedup_page,
    extract_page,
    filters_page,
    finetune_page,
    overview,
    pii_page,
    tokenizers_page,
    training_page,
)
from gristmill.dashboards.run_data import Run, discover_runs, load_run
from gristmill.pipeline import storage

PAGES = {
    "overview": ("Run overview", overview.render),
    "crawl": ("Crawl", crawl_page.render),
    "extract": ("Extract & language", extract_page.render),
    "filters": ("Filters", filters_page.render),
    "dedup": ("Dedup", dedup_page.render),
    "classify": ("Quality classifier", classify_page.render),
    "pii": ("PII", pii_page.render),
    "tokenizers": ("Tokenizers", tokenizers_page.render),
    "training": ("Training", training_page.render),
    "ablations": ("Ablations", ablations_page.render),
    "finetune": ("Fine-tuning", finetune_page.render),
}


def run_target(argv: list[str], environ: dict[str, str]) -> Path | None:
    """The folder to show: `--run PATH` on the command line, else `$GRISTMILL_RUN`, else None."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--run")
    args, _ = parser.parse_known_args(argv)
    value = args.run or environ.get("GRISTMILL_RUN")
    return storage.location(value) if value else None


def _from_query(key: str, options: list[str]) -> None:
    """Seed a widget's state from the URL once, so links like `?page=dedup` open that page."""
    value = st.query_params.get(key)
    if key not in st.session_state and value in options:
        st.session_state[key] = value


def main() -> None:
    st.set_page_config(page_title="gristmill", layout="wide")
    target = run_target(sys.argv[1:], dict(os.environ))
    if target is None:
        st.error("No run folder given: start with `gristmill dashboard RUN_DIR` or set `GRISTMILL_RUN`.")
        return
    runs = discover_runs(target)
    if not runs:
        st.error(f"{target}: no gristmill run here (a run folder holds `workflow.yaml`; "
                 "a folder of runs holds such folders).")
        return
    names = [r.name for r in runs]
    _from_query("run", names)
    _from_query("page", list(PAGES))
    st.sidebar.title("gristmill")
    run_name = st.sidebar.selectbox("Run", names, key="run") if len(runs) > 1 else names[0]
    page = st.sidebar.radio("Page", list(PAGES), format_func=lambda p: PAGES[p][0], key="page")
    st.query_params.update({"page": page, **({"run": run_name} if len(runs) > 1 else {})})
    run_dir = runs[names.index(run_name)]
    st.sidebar.caption(f"run folder: `{run_dir}`")
    title, render = PAGES[page]
    st.title(title)
    try:
        run = Run(run_dir, load_run(run_dir), runs)
    except Exception as error:  # a damaged workflow.yaml or manifest: say which, do not crash
        st.error(f"Cannot read the run folder {run_dir}: {type(error).__name__}: {error}")
        return
    try:
        render(run)
    except Exception as error:  # a page must never show a bare traceback
        st.error(f"This page could not be drawn from {run_dir}: {type(error).__name__}: {error}")
        with st.expander("traceback"):
            st.code(traceback.format_exc(), language="text")


main()
