"""docs/http.md's examples run as written against a real server on the default model with HTTP
on: every block the page marks ``<!-- not run: tests/test_http_docs.py ... -->`` (test_readme.py
runs the rest). "localhost:8000" becomes the test server's HTTP address, and nothing else.

- ```sh blocks: each line runs in bash, in a folder with cat.jpg, and exits 0; a ```json block
  after one shows what its last line prints: the same keys (a subset: fields at their default
  value are left out of protobuf's JSON), the same strings and list lengths, numbers free.
- ```python blocks run and print their ```text title="output" block.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from PIL import Image
from test_readme import ROOT, blocks, same_output, shell_lines

from conftest import DATA, running

PAGE = ROOT / "docs" / "http.md"
MARK = "tests/test_http_docs.py"
HTTP = "localhost:8000"


@pytest.fixture(scope="module")
def address():
    with running(http_port=0, max_delay_ms=20) as (server, _):
        yield f"127.0.0.1:{server.http_port}"


@pytest.fixture()
def folder(tmp_path) -> Path:
    shutil.copy(DATA / "chelsea.jpg", tmp_path / "cat.jpg")
    return tmp_path


def marked(language: str):
    found = []
    page = blocks(PAGE)
    for i, block in enumerate(page):
        if block.language == language and block.not_run and MARK in block.not_run:
            shown = page[i + 1] if i + 1 < len(page) and page[i + 1].language == "json" else None
            found.append((block, shown))
    return found


def like(shown, got, at: str) -> None:
    """``got`` has what ``shown`` shows: its keys, strings and list lengths."""
    if isinstance(shown, dict):
        assert isinstance(got, dict), f"{at}: {got!r}"
        for key, value in shown.items():
            assert key in got, f"{at}: no {key!r} in {sorted(got)}"
            like(value, got[key], f"{at}.{key}")
    elif isinstance(shown, list):
        assert isinstance(got, list) and len(got) == len(shown), f"{at}: {got!r}"
        for i, (a, b) in enumerate(zip(shown, got)):
            like(a, b, f"{at}[{i}]")
    elif isinstance(shown, (str, bool)) or shown is None:
        assert got == shown, f"{at}: {got!r} != {shown!r}"
    else:
        assert isinstance(got, (int, float)) and not isinstance(got, bool), f"{at}: {got!r}"


def test_the_page_has_examples_for_this_test():
    assert len(marked("sh")) >= 4 and len(marked("python")) >= 2


def test_the_shell_examples_run_as_written(address, folder):
    for block, shown in marked("sh"):
        lines = shell_lines(block)
        for number, command in lines:
            at = f"docs/http.md:{number}"
            done = subprocess.run(["bash", "-c", command.replace(HTTP, address)], cwd=folder,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{at}: {done.stderr}"
            if " -o cat.overlay.png" in command:
                assert Image.open(folder / "cat.overlay.png").format == "PNG", at
            elif shown is not None and (number, command) == lines[-1]:
                like(json.loads(shown.code), json.loads(done.stdout), at)
            elif command.startswith("curl"):  # an answer, not an error
                assert "code" not in json.loads(done.stdout), f"{at}: {done.stdout}"


def test_the_python_examples_run_as_written(address, folder, monkeypatch):
    monkeypatch.chdir(folder)
    for block, _ in marked("python"):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(block.code.replace(HTTP, address), str(PAGE), "exec"), {})
        assert block.output is not None, f"docs/http.md:{block.line}: no output block"
        assert same_output(block.output, printed.getvalue()), (
            f"docs/http.md:{block.line}: printed {printed.getvalue()!r}")
    assert os.getcwd() == str(folder)
