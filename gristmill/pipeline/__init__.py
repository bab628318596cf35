"""The machinery every stage shares, and one subpackage per stage type.

Engine: `workflow.py` (YAML -> validated DAG), `stage.py` (stage types and their contract),
`registry.py` (the built-in types), `runner.py` (runs the DAG on Dask), `io.py` (run-folder files),
`status.py` (what is done). Stage types: `read.py`, `write.py`, and the rooms `crawl/`, `extract/`,
`filter/`, `dedup/`, `pii/`; they import the engine, never each other.
"""
