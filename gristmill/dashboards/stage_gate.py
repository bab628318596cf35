"""Choose a page's stage and say plainly when it has nothing to show yet.

A page draws only a stage that is done and whose `stats.json` parses; for every other state it
shows one message (pending, running, interrupted, failed with the error from `_FAILED.json`,
stale with the files that changed, half-written) instead of a traceback.
"""

from __future__ import annotations

import streamlit as st

from gristmill.dashboards.run_data import Run, StageView, UnreadableFile


def choose_stage(run: Run, stage_type: str, key: str) -> StageView | None:
    """The run's stage of `stage_type` (a selectbox when there are several), or None with a message
    when the workflow has none."""
    stages = run.stages_of_type(stage_type)
    if not stages:
        st.info(f"This run's workflow has no `{stage_type}` stage, so there is nothing to show here.")
        return None
    if len(stages) == 1:
        return stages[0]
    names = [s.name for s in stages]
    chosen = st.selectbox(f"{stage_type} stage", names, key=key)
    return stages[names.index(chosen)]


def explain_state(stage: StageView) -> bool:
    """True when the stage is done and readable; otherwise show why not and return False."""
    name = f"`{stage.name}`"
    if stage.state == "pending":
        st.info(f"Stage {name} has not started yet (pending). `gristmill run` on the workflow runs it.")
        return False
    if stage.state == "running":
        st.warning(f"Stage {name} is running; this page fills in when it is done.")
        return False
    if stage.state == "interrupted":
        st.warning(f"Stage {name} started but its process is gone (interrupted); `gristmill run` resumes it.")
        return False
    if stage.state == "stale":
        st.warning(f"Stage {name} finished, but its output changed since (`gristmill run` redoes it): "
                   f"{stage.status.error}")
        return False
    if stage.state == "failed":
        try:
            failure = stage.failure()
        except UnreadableFile as error:
            failure = {"error": str(error)}
        st.error(f"Stage {name} failed: {failure.get('error') or stage.status.error or 'no error recorded'}")
        if failure.get("traceback"):
            with st.expander("traceback"):
                st.code(failure["traceback"], language="text")
        return False
    try:
        stage.stats()
    except UnreadableFile as error:
        st.warning(f"Stage {name} is done but its stats are unreadable (half-written?): {error}")
        return False
    return True


def ready_stage(run: Run, stage_type: str, key: str) -> StageView | None:
    """`choose_stage` then `explain_state`: the stage to draw, or None after a message."""
    stage = choose_stage(run, stage_type, key)
    if stage is None or not explain_state(stage):
        return None
    return stage


def metric(column, label: str, value, fmt: str = "{:,}") -> None:
    """One st.metric that shows `–` for a value the stats do not have."""
    if value is None:
        column.metric(label, "–")
    elif isinstance(value, (int, float)):
        column.metric(label, fmt.format(value))
    else:
        column.metric(label, str(value))
