"""Writes docs/benchmarks.md from bench/results/*.json: for each benchmark script, what it
measures (its docstring's first paragraph), the command that made its latest result, the
machine it ran on, and the tables that command printed.

    .venv/bin/python bench/report.py            # writes docs/benchmarks.md
    .venv/bin/python bench/report.py --check    # exit status 1 if the page is not what it writes
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path
from typing import Dict, Optional

import harness

BENCH = harness.ROOT / "bench"
PAGE = harness.ROOT / "docs" / "benchmarks.md"

# The page's order; each script's results are bench/results/<name>.json.
SCRIPTS = ("bench_core.py", "bench_methods.py", "bench_latency.py", "bench_scale.py",
           "bench_workers.py", "bench_stream.py", "bench_fold.py", "bench_threads.py",
           "trace_latency.py", "bench_http.py", "bench_models.py", "bench_scheduling.py",
           "abuse.py", "soak.py", "bench_gpu.py",
           "perf_analyzer/run.sh")  # under bench/
# How to run the scripts that need what this machine may lack.
ELSEWHERE = {
    "bench_gpu.py": "needs a GPU: `bench/gpu/prepare.sh` here (it fetches the wheels the GPU "
                    "machine lacks), then `bash bench/gpu/run.sh` there, which writes the "
                    "results (JSON and Markdown) to $OUT; `.venv/bin/python bench/bench_gpu.py "
                    "--device cpu --batches 1,2 --seconds 1 --callers 1,2 --model "
                    "torchvision:resnet18` is a smoke run on a CPU",
    "perf_analyzer/run.sh": "needs Triton's perf_analyzer: `make bench-oip` fetches it into "
                            "`build/perf_analyzer/` and runs it; it prints its own table and "
                            "writes no JSON",
}

INTRO = """# Benchmarks

Each script in `bench/` measures one thing against a real server (or the server's own code in
its process) and writes its results as JSON to `bench/results/<script>.json`: the machine, the
versions, the commit, the date, the load average before and after, the command, and the rows.
This page shows the latest result of each, made by `.venv/bin/python bench/report.py` from
those files and nothing else (a test checks that it matches them); the history is in git.
`make bench` runs `bench/bench_core.py` (`make bench ARGS="--quick"` for a short run) and then
the report. Each script's docstring gives its other ways to run; `--json PATH` writes the
results elsewhere.

A speed claim is a table with the in-process baseline measured in the same run, and the ratio
between them. On a shared machine the timings move with whatever else runs: read the load
average beside each result (1, 5 and 15 minutes, as `uptime` gives it) before comparing two.
"""


def description(script: Path) -> str:
    """The first paragraph of a Python script's docstring, or of a shell script's leading
    comment, on one line."""
    text = script.read_text()
    if script.suffix == ".py":
        doc = ast.get_docstring(ast.parse(text)) or ""
    else:
        lines = [line for line in text.splitlines()[1:] if line.startswith("#")]
        doc = "\n".join(line[1:].strip() for line in lines)
    return " ".join(doc.strip().split("\n\n")[0].split())


def result_of(name: str, results: Path) -> Optional[Dict]:
    path = results / f"{Path(name).stem}.json"
    return json.loads(path.read_text()) if path.exists() else None


def section(name: str, doc: Optional[Dict]) -> str:
    parts = [f"## `bench/{name}`", description(BENCH / name)]
    if doc is None:
        parts.append(f"Not run on this machine: it {ELSEWHERE.get(name, 'has no results yet')}.")
        return "\n\n".join(parts)
    m, v, load = doc["machine"], doc["versions"], doc["load_average"]
    where = f"{m['cpu']}, {m['cores']} cores" + (f", {m['gpu']}" if m.get("gpu") else "")
    after = " / ".join(map(str, load["after"])) if load.get("after") else "?"
    commit = (doc.get("commit") or "unknown")[:12] + (
        " (with uncommitted changes)" if (doc.get("commit") or "").endswith("-dirty") else "")
    parts.append(f"```sh\n{doc['command']}\n```")
    parts.append(f"Run {doc['date']} at commit `{commit}` on {where}; load average "
                 f"{' / '.join(map(str, load['before']))} before, {after} after; Python "
                 f"{v.get('python')}, torch {v.get('torch')}.")
    parts.append(harness.render(doc, heading="###").rstrip())
    return "\n\n".join(parts)


def page(results: Path = harness.RESULTS) -> str:
    sections = [section(name, result_of(name, results)) for name in SCRIPTS]
    return INTRO + "\n" + "\n\n".join(sections) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="only check that the page is what this script writes")
    p.add_argument("--results", type=Path, default=harness.RESULTS, help="the JSON folder")
    p.add_argument("--out", type=Path, default=PAGE, help="the page (default %(default)s)")
    args = p.parse_args(argv)
    text = page(args.results)
    if args.check:
        if not args.out.exists() or args.out.read_text() != text:
            print(f"{args.out} is not what bench/report.py writes: run python bench/report.py",
                  file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
