"""Fixtures shared across rooms: one real quickstart run that several tests read."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from tests.quickstart import QUICKSTART, QUICKSTART_TEST_OVERRIDES

pytest_plugins = ["tests.model_fixtures"]


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a real end-to-end quickstart run (LocalCluster of 2 workers)."""
    from gristmill.pipeline.runner import run_workflow

    runs = tmp_path_factory.mktemp("quickstart-runs")
    return run_workflow(QUICKSTART, runs_dir=runs, overrides=QUICKSTART_TEST_OVERRIDES, console=Console(quiet=True))
