"""The built-in stage types: importing a module registers its stage (see `stage.py`)."""

from __future__ import annotations

import importlib

from gristmill.pipeline.stage import STAGE_TYPES, StageType

BUILTIN_STAGE_MODULES = (
    "gristmill.pipeline.read",
    "gristmill.pipeline.write",
    "gristmill.pipeline.crawl.stage",
    "gristmill.pipeline.extract.stage",
    "gristmill.pipeline.filter.stage",
    "gristmill.pipeline.dedup.stage",
    "gristmill.pipeline.pii.stage",
    "gristmill.pipeline.classify.stage",
    "gristmill.model.stage",
    "gristmill.model.evaluate",
    "gristmill.tokenize.stages",
)


def load_builtin_stages() -> dict[str, StageType]:
    """Import every built-in stage module once and return the registry."""
    for module in BUILTIN_STAGE_MODULES:
        importlib.import_module(module)
    return STAGE_TYPES
