"""The docs site builds, every page is in its nav, and the pages agree with the code: the flags
table on docs/server.md is the server's parser, the methods table the registry's, the metrics
the server's. Also `make wheel` (the wheel holds every module of both packages) and `make serve
TORCH_INDEX=...` (torch from that index first), which the README's install section shows.

    .venv/bin/python tests/test_docs.py      # rewrites docs/server.md's flags table
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:  # run as a script
    sys.path.insert(0, str(ROOT / "tests"))

from test_readme import DOCS, README, nav_pages  # noqa: E402

SERVER_PAGE = DOCS / "server.md"
FLAGS = re.compile(r"(<!-- flags -->\n).*?(<!-- end of flags -->)", re.S)


def flags_table() -> str:
    """The flags of `camserve-server --help` as a Markdown table, from the parser itself."""
    from camserve_server.process.settings import build_parser

    rows = ["| flag | default | what it does |", "|---|---|---|"]
    for action in build_parser()._actions:  # argparse offers no public list of its options
        if not action.option_strings or action.help == argparse.SUPPRESS or \
                isinstance(action, argparse._HelpAction):
            continue
        if action.metavar is not None:
            value = f" {action.metavar}"
        elif action.choices is not None:
            value = " {" + ",".join(map(str, action.choices)) + "}"
        elif action.nargs == 0:
            value = ""
        else:
            value = f" {action.dest.upper()}"
        text = (action.help or "").replace("%%", "%")
        found = re.fullmatch(r"(.*) \(default: (.*)\)", text, re.S)
        text, default = (found.group(1), found.group(2)) if found else (text, "")
        cells = [f"`{' '.join(action.option_strings)}{value}`", default, text]
        rows.append("| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells)
                    + " |")
    return "\n".join(rows) + "\n"


def test_the_flags_table_is_the_servers_parser():
    text = SERVER_PAGE.read_text()
    found = FLAGS.search(text)
    assert found, "docs/server.md lost its <!-- flags --> markers"
    shown = found.group(0)[len(found.group(1)):-len(found.group(2))]
    assert shown == flags_table(), (
        "docs/server.md's flags table differs from camserve-server's flags: run "
        "`.venv/bin/python tests/test_docs.py` to rewrite it")


def test_every_page_is_in_the_nav_and_the_readme_links_it():
    listed = nav_pages()
    assert len(listed) == len(set(listed)), "a page is twice in mkdocs.yml's nav"
    pages = sorted(p.name for p in DOCS.glob("*.md"))
    assert sorted(listed) == pages, "mkdocs.yml's nav and docs/*.md differ"
    readme = README.read_text()
    unlinked = [name for name in listed if f"(docs/{name})" not in readme]
    assert not unlinked, f"README.md links no {unlinked}"


def test_the_readme_stays_a_few_screens():
    lines = len(README.read_text().splitlines())
    assert lines <= 250, f"README.md has {lines} lines: move a subject to its docs page"


def test_the_methods_table_lists_every_method():
    from camserve import method_names

    text = (DOCS / "methods.md").read_text()
    shown = re.findall(r"^\| `([a-z_]+)` \|", text, re.M)
    assert shown == list(method_names()), "docs/methods.md's table and CamMethod differ"


def test_every_metric_named_is_the_servers():
    source = "".join(p.read_text() for p in (ROOT / "server/camserve_server").rglob("*.py"))
    named = {m for page in DOCS.glob("*.md")
             for m in re.findall(r"`(camserve_[a-z_]+)`", page.read_text())}
    assert len(named) >= 10, named
    unknown = sorted(m for m in named if f'"{m.removesuffix("_total")}"' not in source)
    assert not unknown, f"the docs name metrics the server lacks: {unknown}"


def test_the_site_builds_with_strict(tmp_path):
    """mkdocs build --strict: a broken link or anchor, or a page missing from the nav, fails."""
    pytest.importorskip("mkdocs", reason="the docs site needs MkDocs: pip install '.[docs]'")
    pytest.importorskip("material", reason="the docs site needs mkdocs-material")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet",
                           "--config-file", str(ROOT / "mkdocs.yml"), "--site-dir",
                           str(tmp_path / "site")], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site/index.html").exists()


def test_make_wheel_holds_both_packages(tmp_path):
    """`make wheel`, on a copy of the checkout (offline: .venv's setuptools): one wheel with
    every module of camserve and camserve_server, torch only in the server extra."""
    source = tmp_path / "src"
    source.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("pyproject.toml", "README.md", "Makefile"):
        shutil.copy(ROOT / name, source / name)
    for name in ("client", "server"):
        shutil.copytree(ROOT / name, source / name, ignore=ignore)
    venv = Path(sys.executable).parent.parent
    done = subprocess.run(["make", "-C", str(source), "wheel", f"VENV={venv}",
                           f"WHEEL_DIR={tmp_path / 'dist'}", "WHEEL_FLAGS=--no-build-isolation"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = (tmp_path / "dist").glob("camserve-*-py3-none-any.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n).decode() for n in names
                        if n.endswith(".dist-info/METADATA"))
    modules = {path.relative_to(source / folder).as_posix()
               for folder in ("client", "server") for path in (source / folder).rglob("*.py")}
    assert modules and not modules - names, f"the wheel lacks {sorted(modules - names)}"
    assert {"camserve/v1/camserve_pb2.pyi", "camserve/py.typed"} <= names
    requires = re.findall(r"^Requires-Dist: (.*)$", metadata, re.M)
    base = [r for r in requires if "extra ==" not in r]
    assert not [r for r in base if r.startswith(("torch", "opencv"))], base
    assert any(r.startswith("torch") and "extra == \"server\"" in r for r in requires), requires


@pytest.mark.parametrize("index", ["", "https://download.pytorch.org/whl/cpu"])
def test_make_serve_takes_torch_from_torch_index(tmp_path, index):
    """`make serve TORCH_INDEX=URL` installs torch and torchvision from URL before the server
    (so pip keeps them); without it, nothing changes."""
    done = subprocess.run(["make", "-n", "-C", str(ROOT), "serve", f"VENV={tmp_path}/venv",
                           f"TORCH_INDEX={index}"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    server = next(i for i, line in enumerate(lines) if "-e '.[server]'" in line)
    torch = [i for i, line in enumerate(lines) if "--index-url" in line]
    if index:
        assert len(torch) == 1 and torch[0] < server, lines
        assert lines[torch[0]].endswith(f"--index-url {index} torch torchvision"), lines
    else:
        assert torch == [], lines


if __name__ == "__main__":
    text = SERVER_PAGE.read_text()
    new = FLAGS.sub(lambda m: m.group(1) + flags_table() + m.group(2), text)
    SERVER_PAGE.write_text(new)
    print("docs/server.md: the flags table", "rewritten" if new != text else "was up to date")
