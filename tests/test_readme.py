"""The examples of README.md and of the docs pages (docs/*.md) run as written against a real
server on the default model, so the pages and the code cannot drift apart.

Every fenced block of every page is run or checked, in page order (README.md, then the docs in
the order of mkdocs.yml's nav), from one folder set up as the README's Quick start says
(cat.jpg, cup.jpg, photos/; clip.mp4 stands for the reader's video and is made here).
"localhost:50051", where `make serve` listens, is replaced by the test server's address, and
nothing else.

- ```python blocks run. One followed by a ```text title="output" block prints exactly that
  (numbers with a decimal point may differ by 2 in their last digit).
- ```console blocks: each `$ camserve ...` line runs, and prints what follows it, as above.
- ```sh blocks: `camserve`, `cp` and `mkdir` lines run, with CAMSERVE_TARGET pointing at the
  test server (a line that needs a camera is parsed only); every `camserve-server` line parses
  with the server's flags; `make` names targets and variables the Makefile has; `pip install`
  names the clone folder (camserve-src) or the wheel, with extras pyproject.toml has;
  `git clone` names the folder camserve-src (a folder named camserve would shadow the package);
  `.venv/bin/python bench/X.py` and `bash bench/...` name scripts that exist, with flags they
  have. Any other command fails the test until it is run or checked here.
- A block after a `<!-- not run: REASON -->` line is only compiled (python) or skipped, and must
  say why.
- Tables with a `| flag | default |` header show the server's defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import io
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import List, Optional

import numpy as np
import pytest

from camserve.cli import build_parser as cli_parser
from camserve_server.process.settings import Settings
from camserve_server.process.settings import build_parser as server_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
MAKE_SERVE = "localhost:50051"  # where the examples expect `make serve`
CLONE = "camserve-src"  # the README's clone folder: not an importable name


def nav_pages() -> List[str]:
    """The docs pages in mkdocs.yml's nav order (paths relative to docs/)."""
    yaml = pytest.importorskip("yaml", reason="reading mkdocs.yml needs PyYAML")
    found: List[str] = []

    def walk(entry):
        if isinstance(entry, str):
            found.append(entry)
        elif isinstance(entry, list):
            for item in entry:
                walk(item)
        elif isinstance(entry, dict):
            for value in entry.values():
                walk(value)

    walk(yaml.safe_load((ROOT / "mkdocs.yml").read_text())["nav"])
    return found


def pages() -> List[Path]:
    """README.md, then every docs page: those of the nav in its order, then any the nav misses
    (tests/test_docs.py fails on those)."""
    listed = [DOCS / name for name in nav_pages() if (DOCS / name).exists()]
    rest = sorted(set(DOCS.glob("*.md")) - set(listed))
    return [README, *listed, *rest]


def where(path: Path, line: int) -> str:
    return f"{path.relative_to(ROOT)}:{line}"


@dataclasses.dataclass
class Block:
    page: Path
    line: int  # the first line of the code
    language: str
    info: str  # what follows the language on the fence line
    code: str
    not_run: Optional[str] = None  # the reason given in <!-- not run: REASON -->
    output: Optional[str] = None  # a python block's ```text title="output" block


_FENCE = re.compile(r"^```([\w-]*)(.*)$")
_NOT_RUN = re.compile(r"^<!--\s*not run:\s*(.*?)\s*-->$")


def blocks(page: Path) -> List[Block]:
    """Every fenced block of a page; an output block is attached to the python block before
    it rather than listed."""
    found: List[Block] = []
    lines = page.read_text().splitlines()
    block, previous = None, ""
    for number, line in enumerate(lines, 1):
        fence = _FENCE.match(line)
        if block is None and fence:
            reason = _NOT_RUN.match(previous.strip())
            block = Block(page, number + 1, fence.group(1), fence.group(2).strip(), "",
                          reason.group(1) if reason else None)
            code: List[str] = []
        elif block is not None and line.strip() == "```":
            block.code = "\n".join(code) + "\n"
            if (block.language == "text" and 'title="output"' in block.info and found
                    and found[-1].language == "python"):
                assert found[-1].output is None, f"{where(page, number)}: two output blocks"
                found[-1].output = block.code
            else:
                found.append(block)
            block = None
        elif block is not None:
            code.append(line)
        if line.strip():
            previous = line
    assert block is None, f"{page.name}: a block is never closed"
    return found


def shell_lines(block: Block):
    """(line number, command) of a shell block; a line ending in a backslash goes on."""
    found, pending, start = [], "", 0
    for i, line in enumerate(block.code.splitlines()):
        if not pending:
            start = block.line + i
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        command = (pending + line).strip()
        pending = ""
        if command and not command.startswith("#"):
            found.append((start, command))
    return found


def all_blocks(language: Optional[str] = None) -> List[Block]:
    return [b for page in pages() for b in blocks(page)
            if language is None or b.language == language]


# What the page's numbers may differ by: integers not at all, decimals by 2 in their last digit.
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def same_output(shown: str, got: str) -> bool:
    a, b = shown.split(), got.split()
    if len(a) != len(b):
        return False
    for x, y in zip(a, b):
        if x == y:
            continue
        if _NUMBER.split(x) != _NUMBER.split(y):
            return False
        for nx, ny in zip(_NUMBER.findall(x), _NUMBER.findall(y)):
            if "." not in nx or "." not in ny:
                if nx != ny:
                    return False
            elif abs(float(nx) - float(ny)) > 2 * 10 ** -len(nx.split(".")[1]) + 1e-9:
                return False
    return True


def _diff(shown: str, got: str) -> str:
    return "\n".join(difflib.unified_diff(shown.splitlines(), got.splitlines(), "the page",
                                          "what it prints now", lineterm=""))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """An empty folder with the checkout's tests/ (for the Quick start's `cp tests/data/...`)
    and a short clip.mp4 (the cat photo sliding across 8 frames)."""
    cv2 = pytest.importorskip("cv2", reason="the stream examples need OpenCV")
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


def _pyproject_extras() -> set:
    text = (ROOT / "pyproject.toml").read_text()
    section = text[text.index("[project.optional-dependencies]"):]
    section = section[:section.index("\n[", 1)]
    return set(re.findall(r"^([a-z][a-z0-9-]*) = \[", section, re.M))


def _make_names():
    text = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([a-z][\w-]*):", text, re.M))
    variables = set(re.findall(r"^([A-Z_]+) \?=", text, re.M))
    return targets, variables


def check_command(words: List[str], at: str) -> Optional[str]:
    """Check a command the test does not run; returns what kind it is, or fails."""
    first = words[0]
    if first == "camserve-server":
        try:
            server_parser().parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"{at}: camserve-server refuses {shlex.join(words)!r}")
        return "server"
    if first == "camserve" and "--camera" in words:  # no camera here: the flags must parse
        try:
            cli_parser().parse_args(words[1:])
        except SystemExit:
            pytest.fail(f"{at}: camserve refuses these arguments")
        return "parsed"
    if first in (".", "source") and words[1:] == [".venv/bin/activate"]:
        return "venv"  # the test's PATH has the venv's bin first
    if first == "make":
        targets, variables = _make_names()
        for word in words[1:]:
            name = word.split("=")[0]
            assert (name in variables) if "=" in word else (name in targets), (
                f"{at}: the Makefile has no {'variable' if '=' in word else 'target'} {name}")
        return "make"
    if first == "git":
        assert words[1] == "clone" and len(words) == 4 and words[3] == CLONE, (
            f"{at}: clone into a folder named {CLONE}: a folder named camserve beside a script "
            "shadows the camserve package")
        return "git"
    if first == "cd":
        assert words[1:] == [CLONE], at
        return "cd"
    if first == "pip":
        assert words[1] == "install", at
        extras = _pyproject_extras()
        rest = iter(words[2:])
        for word in rest:
            if word in ("--index-url", "--extra-index-url"):
                assert next(rest).startswith("https://"), at
            elif word.startswith(f"./{CLONE}") or word.startswith("dist/camserve-"):
                wanted = re.fullmatch(r"[^\[]+(?:\[([\w,-]+)\])?", word).group(1)
                unknown = set(wanted.split(",") if wanted else ()) - extras
                assert not unknown, f"{at}: pyproject.toml has no extra {unknown}"
                if word.startswith("dist/"):
                    version = re.search(r'^version = "([^"]+)"',
                                        (ROOT / "pyproject.toml").read_text(), re.M).group(1)
                    assert word.split("[")[0] == f"dist/camserve-{version}-py3-none-any.whl", at
            else:
                assert word in ("torch", "torchvision"), f"{at}: what is {word!r}?"
        return "pip"
    if first in (".venv/bin/python", "bash") and words[1].startswith("bench/"):
        script = ROOT / words[1]
        assert script.is_file(), f"{at}: {words[1]} does not exist"
        # A script's flags are its own, or those of the harness every bench script shares.
        source = "".join(p.read_text() for p in (script, ROOT / "bench/harness.py")
                         if p.is_file())
        for word in words[2:] if first == ".venv/bin/python" else ():  # bash: perf_analyzer's
            flag = word.split("=")[0]
            if flag.startswith("--"):
                assert f'"{flag}"' in source, f"{at}: {words[1]} has no flag {flag}"
        return "bench"
    return None


def test_the_examples_run_as_written(default_server, workdir, monkeypatch):
    server, _ = default_server
    target = f"127.0.0.1:{server.port}"
    ran = {"sh": [], "checked": [], "console": [], "python": [], "compiled": []}
    # The shell lines first, page by page: the Quick start makes the photos the rest uses.
    for block in all_blocks():
        if block.language not in ("sh", "console"):
            continue
        if block.not_run:
            continue
        if block.language == "console":
            runs = re.split(r"^\$ ", block.code, flags=re.M)
            assert not runs[0].strip(), f"{where(block.page, block.line)}: start with `$ `"
            number = block.line
            for run in runs[1:]:
                command, _, shown = run.partition("\n")
                at = f"{where(block.page, number)}: {command}"
                number += run.count("\n")
                assert shlex.split(command)[0] == "camserve", f"{at}: run it here"
                done = _shell(command, workdir, target)
                assert done.returncode == 0, f"{at}\n{done.stdout}\n{done.stderr}"
                assert same_output(shown, done.stdout), f"{at}\n{_diff(shown, done.stdout)}"
                ran["console"].append(at)
            continue
        for number, command in shell_lines(block):
            at = f"{where(block.page, number)}: {command}"
            kinds = set()
            for part in command.split("&&"):
                words = shlex.split(part, comments=True)
                kind = check_command(words, at)
                if kind is None:
                    assert words[0] in ("camserve", "cp", "mkdir"), (
                        f"{at}: run it here, or check it in check_command")
                kinds.add(kind)
            if kinds != {None}:
                assert None not in kinds, f"{at}: run all of it or none"
                ran["checked"].append(at)
                continue
            done = _shell(command, workdir, target)
            assert done.returncode == 0, f"{at}\n{done.stdout}\n{done.stderr}"
            assert "Traceback" not in done.stderr, f"{at}\n{done.stderr}"
            ran["sh"].append(at)
    monkeypatch.chdir(workdir)
    for block in all_blocks("python"):
        at = where(block.page, block.line)
        if block.not_run:
            compile(block.code, at, "exec")
            ran["compiled"].append(at)
            continue
        if "Client(" in block.code:
            assert f'"{MAKE_SERVE}"' in block.code, f"{at}: connect to {MAKE_SERVE}"
        code = block.code.replace(f'"{MAKE_SERVE}"', f'"{target}"')
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec(compile(code, at, "exec"), {"__name__": "docs"})
        if block.output is not None:
            assert same_output(block.output, printed.getvalue()), (
                f"{at}\n{_diff(block.output, printed.getvalue())}")
        ran["python"].append(at)
    # At least what the pages showed when this test was written, so that a parsing slip cannot
    # make it pass empty.
    counts = {kind: len(found) for kind, found in ran.items()}
    assert counts["sh"] >= 10 and counts["console"] >= 4 and counts["python"] >= 4, counts
    assert counts["checked"] >= 35 and counts["compiled"] >= 2, counts
    assert (workdir / "annotated.mp4").exists()


def test_the_readme_picture_is_what_the_examples_make(workdir, default_server):
    """The README's picture, docs/chelsea.overlay.png, is the overlay of its Python example,
    cat.overlay.png (run by the test above; `camserve explain cat.jpg -o out/` writes the same,
    before later examples write other maps of cat.jpg there)."""
    from PIL import Image

    made = workdir / "cat.overlay.png"
    if not made.exists():
        pytest.skip("test_the_examples_run_as_written did not run")
    a = np.asarray(Image.open(made).convert("RGB")).astype(int)
    b = np.asarray(Image.open(DOCS / "chelsea.overlay.png").convert("RGB")).astype(int)
    assert a.shape == b.shape and np.abs(a - b).max() <= 2, "remake docs/chelsea.overlay.png"


def test_every_block_is_run_or_says_why_not():
    for block in all_blocks():
        at = where(block.page, block.line)
        # toml: model configs, which tests/test_repository.py's test_the_docs_configs_load reads
        assert block.language in ("python", "sh", "console", "text", "json", "toml", ""), (
            f"{at}: ```{block.language} blocks are neither run nor checked here")
        if block.not_run is not None:
            assert len(block.not_run) > 10, f"{at}: say why it is not run"


_UNITS = {"": 1, "M": 10**6, "Mi": 2**20, "MiB": 2**20}


def test_the_flag_tables_show_the_servers_defaults():
    """Each row of a `| flag | default |` table names a flag the server has, with its default
    (the full table on server.md is generated: tests/test_docs.py checks it)."""
    defaults = Settings()
    dests = {action.option_strings[0]: action.dest for action in server_parser()._actions
             if action.option_strings}
    rows = []
    for page in pages():
        text = re.sub(r"<!-- flags -->.*<!-- end of flags -->", "", page.read_text(), flags=re.S)
        for table in re.findall(r"^\| flag \| default \|.*\n(?:\|.*\n)+", text, re.M):
            rows += [(page, *row) for row in
                     re.findall(r"^\| `(--[a-z0-9-]+)` \| ([^|]*) \|", table, re.M)]
    assert len(rows) >= 4
    for page, flag, shown in rows:
        at = f"{page.name}: {flag}"
        assert flag in dests, f"{at}: camserve-server has no such flag"
        found = re.fullmatch(r"([0-9.]+)\s*([A-Za-z]*)", shown.strip())
        assert found and found.group(2) in _UNITS, f"{at}: cannot read the default {shown!r}"
        value = float(found.group(1)) * _UNITS[found.group(2)]
        actual = getattr(defaults, dests[flag])
        assert value == pytest.approx(float(actual)), (
            f"{at}: the page says {shown.strip()}; the server's default is {actual}")


def test_repository_scripts_run_with_the_venvs_python():
    """`make serve` installs into .venv, and the system Python lacks what the scripts import:
    a command on these pages that runs one of the repository's scripts says .venv/bin/python."""
    bare = [(where(page, number), line.strip()) for page in pages()
            for number, line in enumerate(page.read_text().splitlines(), 1)
            if re.search(r"(?<![\w/.-])python3? +[\w./-]+\.py", line)]
    assert not bare, f"use .venv/bin/python: {bare}"


# Files the reader makes or brings, which the pages name as examples.
_THEIRS = {"cat.jpg", "cup.jpg", "clip.mp4", "labels.txt", "tokens.txt", "ckpt.pth", "model.pt",
           "state.pt", "resnet50.pth", "cat.overlay.png", "input.json"}


def test_every_file_the_pages_name_exists():
    """Paths in `code` on these pages (tests/test_cli.py, render/images.py, cams.py) name files
    of the checkout: from its root, from server/camserve_server/, or found under server/,
    client/, bench/, tests/ or docs/ when only a file name is given (google/... is a
    package's)."""
    missing, seen = [], 0
    for page in pages():
        text = page.read_text()
        tokens = set(re.findall(
            r"`([\w./*-]+\.(?:py|proto|sh|yaml|yml|toml|txt|md|png|jpg))`", text))
        tokens |= set(re.findall(r"^([\w./-]+\.(?:py|proto))\s", text, re.M))  # layout blocks
        tokens |= set(re.findall(r"^((?:client|server|protos|tests|bench|deploy|docker|docs)"
                                 r"/[\w./-]*)\s", text, re.M))
        seen += len(tokens)
        for token in sorted(tokens):
            if (token.startswith(("$", "/", "google/", "out/", "photos/")) or token in _THEIRS
                    or "NAME" in token):
                continue
            places = [ROOT / token, ROOT / "server/camserve_server" / token]
            if "/" not in token:
                places += [p for folder in ("server", "client", "bench", "tests", "docs", "protos")
                           for p in (ROOT / folder).rglob(token)]
            if not any(any(ROOT.glob(str(p.relative_to(ROOT)))) if "*" in token else p.exists()
                       for p in places):
                missing.append(f"{page.name}: {token}")
    assert seen >= 40
    assert not missing, f"the pages name files that do not exist: {missing}"
