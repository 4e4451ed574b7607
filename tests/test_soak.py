"""A short soak through bench/soak.py: every call ends (nothing lost), with an answer or an
expected status."""

from __future__ import annotations

import sys
from pathlib import Path

from conftest import TINY, running

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import soak  # noqa: E402


def test_short_soak_loses_nothing():
    with running(model=TINY, max_queue=6, max_batch_size=4) as (server, _):
        result = soak.run(f"127.0.0.1:{server.port}", callers=12, requests=25, seconds=60)
    assert result["lost"] == 0
    assert result["sent"] == 12 * 25
    assert result["answered"] > result["sent"] // 3
    assert set(result["rejected"]) <= {"INVALID_ARGUMENT", "DEADLINE_EXCEEDED",
                                       "RESOURCE_EXHAUSTED"}, result["rejected"]
    assert result["rejected"].get("INVALID_ARGUMENT", 0) > 0
