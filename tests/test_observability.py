"""Prometheus metrics move as calls are served; logs are one line per event, JSON on request."""

from __future__ import annotations

import json
import logging
import urllib.request

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from camserve import CamserveError
from camserve_server.process.logs import JsonFormatter

from conftest import TINY, running

PLAIN = np.full((64, 64, 3), 90, np.uint8)


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_as_expected():
    with running(model=TINY, metrics_port=0) as (server, client):
        port = server.metrics_port
        before = scrape(port)
        assert value(before, "camserve_state", state="serving") == 1
        assert value(before, "camserve_model_load_seconds") > 0
        client.predict(PLAIN)
        client.predict_many([PLAIN, PLAIN])
        client.explain(PLAIN)
        with pytest.raises(CamserveError):
            client.predict(b"not an image")
        after = scrape(port)
    ok = value(after, "camserve_requests_total", rpc="Predict", code="OK") - value(
        before, "camserve_requests_total", rpc="Predict", code="OK")
    assert ok == 2
    assert value(after, "camserve_requests_total", rpc="Explain", code="OK") == 1
    assert value(after, "camserve_requests_total", rpc="Predict", code="INVALID_ARGUMENT") == 1
    waited = dict(name="camserve_queue_seconds_count", priority="1", caller="peer")
    items = value(after, **waited) - value(before, **waited)
    assert items == 4  # unary calls at priority 1, their callers named by connection
    for priority in ("1", "2", "3", "delayed"):
        assert ("camserve_queue_priority_depth", (("priority", priority),)) in after
    batches = value(after, "camserve_batch_size_count") - value(before,
                                                                "camserve_batch_size_count")
    sizes = value(after, "camserve_batch_size_sum") - value(before, "camserve_batch_size_sum")
    assert 1 <= batches <= 4 and sizes == 4
    assert value(after, "camserve_compute_seconds_count") >= batches
    assert value(after, "camserve_request_seconds_count", rpc="Explain") == 1
    assert value(after, "camserve_queue_depth") == 0
    assert value(after, "camserve_items_dropped_total", reason="deadline") == 0


def test_access_log_lines_are_json(caplog):
    caplog.set_level(logging.INFO, logger="camserve_server.access")
    with running(model=TINY) as (_, client):
        client.predict_many([PLAIN, PLAIN])
        with pytest.raises(CamserveError):
            client.explain(PLAIN, layer="nope")
    records = [r for r in caplog.records if r.name == "camserve_server.access"]
    lines = [json.loads(JsonFormatter().format(r)) for r in records]
    predict = next(line for line in lines if line["rpc"] == "Predict")
    assert predict["code"] == "OK" and predict["items"] == 2 and predict["ms"] > 0
    assert len(predict["request_id"]) == 16 and predict["peer"]
    explain = next(line for line in lines if line["rpc"] == "Explain")
    assert explain["code"] == "INVALID_ARGUMENT" and explain["level"] == "INFO"


def test_a_write_to_a_caller_that_has_gone_is_not_logged_as_an_error(capsys):
    """gRPC's ERROR with a traceback for an answer that could not be written (the caller went
    away mid-write) is lowered to DEBUG; other gRPC errors stay errors."""
    import logging

    from camserve_server.process import logs

    class ExecuteBatchError(Exception):
        pass

    root, grpc_log = logging.getLogger(), logging.getLogger("grpc._cython.cygrpc")
    saved = root.handlers[:], root.level, grpc_log.filters[:]
    try:
        logs.configure("INFO", "text")
        try:
            raise ExecuteBatchError('Failed "execute_batch"')
        except ExecuteBatchError:
            grpc_log.exception("ExecuteBatchError raised in core by servicer method [/x/Y]")
        grpc_log.error("something else went wrong")
    finally:
        root.handlers[:], grpc_log.filters[:] = saved[0], saved[2]
        root.setLevel(saved[1])
    err = capsys.readouterr().err
    assert "ExecuteBatchError" not in err and "something else went wrong" in err
