"""The code in the docs is real.

Every ```python block in the docs must compile (top-level ``await`` is allowed in fragments). A block whose first
line is ``# doc-test`` is a complete program: it defines ``async def main()``, ends with ``asyncio.run(main())``
and is run as a script in a fresh interpreter. If a ```text block follows it (only blank lines between), that
block is the exact output the program must print.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNNABLE_DOCS = (
    "docs/concepts.md",
    "docs/backends/memory.md",
    "docs/backends/nats.md",
    "docs/backends/ably.md",
    "docs/integrations/gateway.md",
    "docs/integrations/vercel.md",
    "docs/integrations/langchain.md",
)
COMPILED_DOCS = (*RUNNABLE_DOCS, "docs/writing-a-backend.md")
MARKER = "# doc-test"
TIMEOUT = 60.0

_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")
# Signs in stderr that a program misbehaved even though it exited with status 0.
_STDERR_PROBLEMS = ("Traceback", "Exception ignored", "never awaited", "Task was destroyed", "Warning:")


@dataclass(frozen=True)
class Block:
    doc: str
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    expected_output: str | None = None

    @property
    def where(self) -> str:
        return f"{self.doc}:{self.line}"

    @property
    def runnable(self) -> bool:
        lines = self.code.splitlines()
        return bool(lines) and lines[0].strip() == MARKER


def fenced_blocks(doc: str) -> list[Block]:
    """Every fenced block of a markdown file, in order; a runnable block gets the text block that follows it."""
    lines = (ROOT / doc).read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        opening = _FENCE_OPEN.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, start = opening["indent"], i
        i += 1
        body: list[str] = []
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        if i == len(lines):
            raise AssertionError(f"{doc}:{start + 1}: a code fence is never closed")
        i += 1
        blocks.append(Block(doc, start + 1, opening["lang"], textwrap.dedent("\n".join(body)) + "\n"))
    # Attach each text block to the runnable python block right before it (blank lines only in between).
    result: list[Block] = []
    for block in blocks:
        previous = result[-1] if result else None
        if (
            block.lang == "text"
            and previous is not None
            and previous.lang == "python"
            and previous.runnable
            and previous.expected_output is None
            and _only_blank_between(lines, previous, block)
        ):
            result[-1] = Block(previous.doc, previous.line, previous.lang, previous.code, block.code)
            continue
        result.append(block)
    return result


def _only_blank_between(lines: list[str], first: Block, second: Block) -> bool:
    end_of_first = first.line + len(first.code.splitlines())  # the 0-based index of its closing fence
    return all(not line.strip() for line in lines[end_of_first + 1 : second.line - 1])


def python_blocks(docs: tuple[str, ...]) -> list[Block]:
    return [block for doc in docs for block in fenced_blocks(doc) if block.lang == "python"]


ALL_PYTHON = python_blocks(COMPILED_DOCS)
RUNNABLE = [block for block in python_blocks(RUNNABLE_DOCS) if block.runnable]


@pytest.mark.parametrize("doc", RUNNABLE_DOCS)
def test_doc_has_runnable_examples(doc: str) -> None:
    assert any(block.doc == doc for block in RUNNABLE), f"{doc} has no '{MARKER}' python block"


def test_only_runnable_docs_are_marked() -> None:
    marked = [block.where for block in ALL_PYTHON if block.runnable and block.doc not in RUNNABLE_DOCS]
    assert not marked, f"'{MARKER}' blocks in a document whose examples are not run: {marked}"


@pytest.mark.parametrize("block", ALL_PYTHON, ids=lambda block: block.where)
def test_python_block_compiles(block: Block) -> None:
    try:
        compile(block.code, block.where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True)
    except SyntaxError as exc:
        pytest.fail(f"{block.where}: the python block does not compile: {exc}")


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda block: block.where)
def test_runnable_block_is_a_program(block: Block) -> None:
    tree = ast.parse(block.code, block.where)
    mains = [node for node in tree.body if isinstance(node, ast.AsyncFunctionDef) and node.name == "main"]
    assert mains, f"{block.where}: a '{MARKER}' block must define 'async def main()'"
    last = tree.body[-1]
    assert isinstance(last, ast.Expr) and ast.unparse(last) == "asyncio.run(main())", (
        f"{block.where}: a '{MARKER}' block must end with 'asyncio.run(main())'"
    )
    # Runnable blocks need no outside service: the embedded backend, or a server the block starts itself.
    self_contained = ("memory://", "MemoryBackend", "NatsServer()", "AblyEmulator(")
    assert any(marker in block.code for marker in self_contained), f"{block.where}: use a self-contained backend"


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda block: block.where)
def test_runnable_block_runs(block: Block, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    # Blank lines up to the block's first line, so tracebacks point at the line in the markdown file.
    script.write_text("\n" * block.line + block.code, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    try:
        done = subprocess.run(
            [sys.executable, "-W", "error", str(script)],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{block.where}: the example did not finish within {TIMEOUT:g}s")
    stderr = done.stderr.replace(str(script), block.doc)
    assert done.returncode == 0, f"{block.where}: the example failed (exit status {done.returncode}):\n{stderr}"
    problems = [sign for sign in _STDERR_PROBLEMS if sign in done.stderr]
    assert not problems, f"{block.where}: the example wrote {problems} to stderr:\n{stderr}"
    if block.expected_output is not None:
        assert done.stdout == block.expected_output, (
            f"{block.where}: the example printed\n{done.stdout}\nbut the document shows\n{block.expected_output}"
        )


def test_examples_and_doc_programs_pass_mypy_strict(tmp_path: Path) -> None:
    """What users copy must type-check as strictly as the library: the examples (the README's is one of them)
    and every complete program in the docs."""
    files = sorted(str(path) for path in (ROOT / "examples").glob("*.py"))
    for block in RUNNABLE:
        script = tmp_path / f"{block.doc.replace('/', '_').replace('.', '_')}_{block.line}.py"
        script.write_text("\n" * block.line + block.code, encoding="utf-8")
        files.append(str(script))
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--strict",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(tmp_path / "cache"),
            "--follow-imports",
            "silent",
            *files,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    report = done.stdout.replace(str(tmp_path) + os.sep, "")
    assert done.returncode == 0, f"mypy --strict found problems in examples or docs:\n{report}"
