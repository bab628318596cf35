"""The documentation builds, and its examples are still true.

- `mkdocs build --strict` passes: a broken link or anchor, or a page missing from the nav, fails.
- Every ```yaml block in README.md, CONTRIBUTING.md and docs/*.md validates with gristmill's own
  loader. A block with a top-level `stages:` is a whole workflow and is loaded as written. A block of
  stage name -> settings (each with a `type:`) is a fragment: it is wrapped in a workflow whose
  upstream stages that the block does not show are `read` stages. Path inputs are created as empty
  files in a scratch folder (globs filled in), so examples must name inputs by relative paths.
- The Python example of docs/writing-a-stage.md registers a working stage type.
- README.md stays short and keeps the two commands, the DAG and the benchmark table.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
import yaml

from gristmill.pipeline.workflow import expand_env, load_workflow

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DOC_FILES = [ROOT / "README.md", ROOT / "CONTRIBUTING.md", *sorted(DOCS.glob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
STAGE_NAME = re.compile(r"[A-Za-z0-9_-]+")
DAG = "crawl ─▶ extract ─▶ filter ─▶ dedup ─▶ pii ─▶ tokenizers ─▶ pack ─▶ train"


def fenced_blocks(path: Path, language: str) -> list[tuple[int, str]]:
    """(line number, body) of every fenced block of `language` in a Markdown file."""
    text = path.read_text()
    return [
        (text.count("\n", 0, match.start()) + 1, match.group(2))
        for match in FENCE.finditer(text)
        if match.group(1) == language
    ]


def yaml_examples() -> list:
    return [
        pytest.param(path, line, body, id=f"{path.relative_to(ROOT)}:{line}")
        for path in DOC_FILES
        for line, body in fenced_blocks(path, "yaml")
    ]


def as_workflow(block: dict, where: str) -> dict:
    """A whole workflow as it is; a fragment of stages wrapped, with `read` stages standing in for
    the upstream stages it names but does not show."""
    if "stages" in block:
        return block
    if not block or not all(isinstance(v, dict) and "type" in v for v in block.values()):
        raise AssertionError(
            f"{where}: a ```yaml block must be a workflow (top-level `stages:`) or stage name -> "
            f"settings with `type:` (see CONTRIBUTING.md, 'Documentation')"
        )
    stages = dict(block)
    for settings in block.values():
        inputs = settings.get("input") or []
        for entry in [inputs] if isinstance(inputs, str) else inputs:
            if entry not in stages and STAGE_NAME.fullmatch(entry):
                stages[entry] = {"type": "read", "input": "upstream.jsonl"}
    return {"stages": stages}


def create_path_inputs(workflow: dict, folder: Path) -> None:
    """An empty file for every relative path input, so the loader's existence check passes."""
    (folder / "upstream.jsonl").touch()
    for name, settings in workflow["stages"].items():
        inputs = settings.get("input") or []
        for entry in [inputs] if isinstance(inputs, str) else inputs:
            if entry in workflow["stages"]:
                continue
            path = str(expand_env(entry, f"stage {name!r}, key 'input'"))
            if Path(path).is_absolute():
                continue  # the loader reports it if it does not exist
            concrete = path.replace("**/", "").replace("*", "x")
            target = folder / concrete / "x.txt" if concrete.endswith("/") else folder / concrete
            target.parent.mkdir(parents=True, exist_ok=True)
            target.touch()


def first_table(markdown: str) -> list[str]:
    """The lines of the first Markdown table in a text."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| "))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("| ")), len(lines))
    return lines[start:end]


def load_doc_stage_example() -> dict:
    """Run the Python example of docs/writing-a-stage.md; returns its namespace."""
    [(_, code)] = fenced_blocks(DOCS / "writing-a-stage.md", "python")
    namespace: dict = {"__name__": "gristmill_docs_example"}
    exec(compile(code, str(DOCS / "writing-a-stage.md"), "exec"), namespace)
    return namespace


def test_mkdocs_build_strict_passes(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"), "-d", str(tmp_path)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    contributing = (tmp_path / "contributing" / "index.html").read_text()
    assert "How to add a stage type" in contributing  # CONTRIBUTING.md is included, not linked


@pytest.mark.parametrize(("path", "line", "body"), yaml_examples())
def test_yaml_example_validates_with_the_workflow_loader(path, line, body, tmp_path):
    load_doc_stage_example()  # docs/writing-a-stage.md's YAML uses the stage type it defines
    where = f"{path.relative_to(ROOT)}:{line}"
    block = yaml.safe_load(body)
    workflow = as_workflow(block, where)
    create_path_inputs(workflow, tmp_path)
    workflow_file = tmp_path / "workflow.yaml"
    workflow_file.write_text(yaml.safe_dump(workflow, allow_unicode=True, sort_keys=False))
    loaded = load_workflow(workflow_file)
    assert set(workflow["stages"]) == set(loaded.stages), where


def test_doc_yaml_examples_exist_for_every_stage_page():
    for page in ("crawl", "extract", "filter", "dedup", "pii", "read-write", "tokenizers", "pack", "train"):
        assert fenced_blocks(DOCS / f"{page}.md", "yaml"), f"docs/{page}.md has no ```yaml example"


def test_writing_a_stage_example_keeps_long_and_removes_short_documents():
    namespace = load_doc_stage_example()
    config = namespace["ShortConfig"](type="drop_short", min_chars=5)
    table = pa.table({"id": ["a", "b", "c"], "text": ["long enough", "tiny", "also long"]})
    out = namespace["drop_short"](table, config)
    assert out.kept.column("id").to_pylist() == ["a", "c"]
    assert out.removed.column("id").to_pylist() == ["b"]
    assert out.removed.column("reason").to_pylist() == ["drop_short"]
    assert out.stats == {"removed": 1}


def test_a_fragment_that_no_longer_validates_fails(tmp_path):
    block = yaml.safe_load("filter:\n  type: filter\n  input: extract\n  gopher_quality: {min_doc_wordz: 5}\n")
    workflow = as_workflow(block, "example")
    create_path_inputs(workflow, tmp_path)
    workflow_file = tmp_path / "workflow.yaml"
    workflow_file.write_text(yaml.safe_dump(workflow))
    with pytest.raises(ValueError, match="min_doc_wordz"):
        load_workflow(workflow_file)


def test_readme_is_short_and_keeps_the_commands_the_dag_and_the_benchmarks():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    bash = "\n".join(body for _, body in fenced_blocks(ROOT / "README.md", "bash"))
    assert re.search(r"^make demo\b", bash, re.M) and re.search(r"^make test\b", bash, re.M)
    assert DAG in readme
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo: install\n\t\$\(BIN\)/gristmill run workflows/quickstart.yaml$", makefile, re.M)
    assert re.search(r"^test: install\n\t\$\(BIN\)/pytest", makefile, re.M)
    table = first_table((DOCS / "benchmarks.md").read_text())
    assert table and all(line in readme for line in table), "README's benchmark table differs from docs/benchmarks.md"
    names = {p.stem for p in (ROOT / "benchmarks").glob("*.py")} - {"__init__", "sample_pages", "measure"}
    for name in names:
        assert f"| `{name}` |" in readme, f"benchmark {name} is missing from README's table"


def test_readme_links_into_docs_exist():
    readme = (ROOT / "README.md").read_text()
    links = re.findall(r"\]\(((?:docs/|CONTRIBUTING)[^)#]*)", readme)
    assert links
    for link in links:
        assert (ROOT / link).is_file(), f"README.md links to {link}, which does not exist"
