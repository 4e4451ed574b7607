"""README.md's examples run as written against a real server on the default model, so the
page and the code cannot drift apart.

- Every ```python block of the user's sections (Quick start to CLI) runs, in order, from a
  folder set up as the Quick start says (cat.jpg, cup.jpg, photos/; clip.mp4 stands for the
  reader's video and is made here). "localhost:50051", where `make serve` listens, is replaced
  by the test server's address, and nothing else.
- Every `camserve`, `cp` and `mkdir` line of those sections' ```sh blocks runs in a shell, with
  CAMSERVE_TARGET pointing at the test server; a line that needs a camera is parsed only.
- Every `camserve-server` line anywhere on the page parses with the server's own flags, and the
  knobs table's flags and defaults are the server's.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from camserve.cli import build_parser as cli_parser
from camserve_server.process.settings import build_parser as server_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# The sections written for the user's first hour, whose examples run here; the rest of the page
# (deployment, scaling, GPUs, benchmarks) has its own checks.
RUN_SECTIONS = ("Quick start", "Python", "Methods, several classes and layers, and how far to "
                "trust a map", "CLI")
MAKE_SERVE = "localhost:50051"  # where the examples expect `make serve`


def _blocks(language: str):
    """(section, first line number, code) of each fenced block in that language; section is the
    title of the `## ` heading above it."""
    section, block, start, found = "", None, 0, []
    for number, line in enumerate(README.read_text().splitlines(), 1):
        if block is None and line.startswith("## "):
            section = line[3:].strip()
        elif block is None and line.strip() == f"```{language}":
            block, start = [], number + 1
        elif block is not None and line.strip() == "```":
            found.append((section, start, "\n".join(block) + "\n"))
            block = None
        elif block is not None:
            block.append(line)
    return found


def _shell_lines():
    """(section, line number, command) of every line of the ```sh blocks."""
    return [(section, start + i, line.strip()) for section, start, code in _blocks("sh")
            for i, line in enumerate(code.splitlines()) if line.strip()]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An empty folder with the checkout's tests/ (for the Quick start's `cp tests/data/...`)
    and a short clip.mp4 (the cat photo sliding across 8 frames)."""
    cv2 = pytest.importorskip("cv2", reason="the README's stream examples need OpenCV")
    folder = tmp_path_factory.mktemp("readme")
    (folder / "tests").symlink_to(ROOT / "tests")
    cat = cv2.imread(str(ROOT / "tests/data/chelsea.jpg"))
    writer = cv2.VideoWriter(str(folder / "clip.mp4"), cv2.VideoWriter_fourcc(*"mp4v"), 10,
                             (320, 240))
    assert writer.isOpened(), "OpenCV cannot write mp4v here"
    small = cv2.resize(cat, (160, 106))
    for i in range(8):
        canvas = np.full((240, 320, 3), 40, np.uint8)
        canvas[60:166, i * 20:i * 20 + 160] = small
        writer.write(canvas)
    writer.release()
    return folder


def _shell(command: str, folder: Path, target: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, CAMSERVE_TARGET=target,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(["bash", "-c", command], cwd=folder, capture_output=True, text=True,
                          timeout=300, env=env)


def test_the_readme_examples_run_as_written(default_server, workdir, monkeypatch):
    server, _ = default_server
    target = f"127.0.0.1:{server.port}"
    ran = {"sh": [], "parsed": [], "python": []}
    # The shell lines first: the Quick start makes the photos the Python examples use.
    for section, number, command in _shell_lines():
        if section not in RUN_SECTIONS:
            continue
        words = shlex.split(command, comments=True)
        where = f"README.md:{number}: {command}"
        if words[0] == "make" or command.startswith(". .venv/bin/activate"):
            continue  # the test's server stands in for `make serve`; the venv's PATH is set
        assert words[0] in ("camserve", "cp", "mkdir"), f"{where}: run it here, or say why not"
        if "--camera" in words:  # no camera here: the flags must parse
            try:
                cli_parser().parse_args(words[1:])
            except SystemExit:
                pytest.fail(f"{where}: camserve refuses these arguments")
            ran["parsed"].append(number)
            continue
        done = _shell(command, workdir, target)
        assert done.returncode == 0, f"{where}\n{done.stdout}\n{done.stderr}"
        assert "Traceback" not in done.stderr, f"{where}\n{done.stderr}"
        ran["sh"].append(number)
    monkeypatch.chdir(workdir)
    for section, number, code in _blocks("python"):
        if section not in RUN_SECTIONS:
            continue
        if "Client(" in code:
            assert f'"{MAKE_SERVE}"' in code, f"README.md:{number}: connect to {MAKE_SERVE}"
        code = code.replace(f'"{MAKE_SERVE}"', f'"{target}"')
        exec(compile(code, f"README.md:{number}", "exec"), {"__name__": "readme"})
        ran["python"].append(number)
    # At least what the page showed when this test was written, so that a parsing slip cannot
    # make it pass empty: 5 Quick start lines, 10 CLI lines (one parsed only), 3 Python blocks.
    assert len(ran["sh"]) >= 14 and len(ran["parsed"]) >= 1 and len(ran["python"]) >= 3, ran
    assert (workdir / "out/cat.overlay.png").exists() and (workdir / "annotated.mp4").exists()


def test_every_camserve_server_line_parses_with_the_servers_flags():
    lines = [(number, command) for _, number, command in _shell_lines()
             if command.startswith("camserve-server")]
    assert len(lines) >= 5
    for number, command in lines:
        words = shlex.split(command, comments=True)[1:]
        try:
            server_parser().parse_args(words)
        except SystemExit:
            pytest.fail(f"README.md:{number}: camserve-server refuses {command!r}")


_UNITS = {"": 1, "M": 10**6, "Mi": 2**20, "MiB": 2**20}


def test_the_knobs_table_matches_the_servers_flags():
    """Each row of the knobs table names a flag the server has, with its default."""
    text = README.read_text()
    table = text[text.index("### Batching knobs"):]
    table = table[:table.index("\n\n", table.index("| flag |"))]
    rows = re.findall(r"^\| `(--[a-z0-9-]+)` \| ([^|]*) \|", table, re.M)
    assert len(rows) >= 10
    defaults = {action.option_strings[0]: action.default for action in server_parser()._actions
                if action.option_strings}
    for flag, shown in rows:
        assert flag in defaults, f"the knobs table shows {flag}, which camserve-server lacks"
        found = re.fullmatch(r"([0-9.]+)\s*([A-Za-z]*)", shown.strip())
        assert found and found.group(2) in _UNITS, f"{flag}: cannot read the default {shown!r}"
        value = float(found.group(1)) * _UNITS[found.group(2)]
        assert value == pytest.approx(float(defaults[flag])), (
            f"the knobs table says {flag} defaults to {shown.strip()}; the server says "
            f"{defaults[flag]}")



def test_repository_scripts_run_with_the_venvs_python():
    """`make serve` installs into .venv, and the system Python lacks what the scripts import:
    a command on this page that runs one of the repository's scripts says .venv/bin/python."""
    bare = [(number, line.strip()) for number, line in
            enumerate(README.read_text().splitlines(), 1)
            if re.search(r"(?<![\w/.-])python3? +(-m +\S+|[\w./-]+\.py)", line)]
    assert not bare, f"use .venv/bin/python: {bare}"


def test_every_file_the_page_names_exists():
    """Paths in `code` on this page (tests/test_cli.py, render/images.py, calls.py) name files
    of the checkout: from its root, from server/camserve_server/, or found under server/,
    client/, bench/ or tests/ when only a file name is given (google/... is a package's)."""
    text = README.read_text()
    tokens = set(re.findall(r"`([\w./*-]+\.(?:py|proto|sh|yaml|yml|toml|txt|md|png|jpg))`",
                            text))
    tokens |= set(re.findall(r"^([\w./-]+\.(?:py|proto))\s", text, re.M))  # the layout block
    tokens |= set(re.findall(r"^((?:client|server|protos|tests|bench)/[\w./-]*/)\s", text,
                             re.M))
    assert len(tokens) >= 10, tokens
    missing = []
    for token in sorted(tokens):
        if token.startswith(("$", "/", "google/")) or token in ("cat.jpg", "cup.jpg") or \
                token.split("/")[0] in ("out", "photos", "docs"):
            if token.startswith("docs/") and not (ROOT / token).exists():
                missing.append(token)
            continue
        places = [ROOT / token, ROOT / "server/camserve_server" / token]
        if "/" not in token:
            places += [p for folder in ("server", "client", "bench", "tests")
                       for p in (ROOT / folder).rglob(token)]
        if not any(any(ROOT.glob(str(p.relative_to(ROOT)))) if "*" in token else p.exists()
                   for p in places):
            missing.append(token)
    assert not missing, f"README.md names files that do not exist: {missing}"
