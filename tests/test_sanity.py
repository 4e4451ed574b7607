"""CheckSanity: the parameter-randomisation and class-discrimination checks, run by the server
on a copy of the served model; the client's check_sanity and `camserve evaluate --sanity`."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_methods import INSENSITIVE

from camserve import CamserveError
from camserve.cli import main as cli_main
from camserve.v1 import camserve_pb2 as pb
from camserve_server.domain import METHODS, SLICE_FORWARDS, SanityPlan
from camserve_server.engine import sanity
from camserve_server.engine.engine import Engine
from camserve_server.engine.models import load_model
from camserve_server.engine.spec import ModelSpec
from camserve_server.errors import DeadlineExceeded, ResourceExhausted

import tiny_models
from conftest import TINY, resized, running

SLOW = "python:tiny_models:slow_cnn"

# Score-CAM's and AblationCAM's forwards per channel are the cost
CHEAP = tuple(m for m in METHODS if not METHODS[m].channel_forwards)


def test_spearman_equals_scipy_with_ties():
    rng = np.random.default_rng(3)
    for _ in range(20):
        a = np.maximum(rng.normal(size=49), 0).round(1)  # ReLU'd maps: many tied zeros
        b = np.maximum(rng.normal(size=49) + a, 0).round(1)
        assert sanity.spearman(a, b) == pytest.approx(spearmanr(a, b).statistic, abs=1e-9)
    flat = np.zeros(49)
    assert sanity.spearman(flat, flat) == 1.0  # a blank map that stayed blank did not change
    assert sanity.spearman(flat, np.arange(49.0)) == 0.0


@pytest.fixture(scope="module")
def photos(cat, coffee):
    return [resized(cat, (224, 224)), resized(coffee, (224, 224))]


@pytest.fixture(scope="module")
def checked(default_server, photos):
    """CheckSanity on the default model, every method but Score-CAM, while other callers'
    Explain calls run; their answers before, during and after."""
    _, client = default_server
    served = lambda: client.explain_many(photos, method=["gradcam", "eigencam"])  # noqa: E731
    before = served()
    during = []
    done = threading.Event()

    def others():
        while not done.is_set():
            during.append(served())

    caller = threading.Thread(target=others)
    caller.start()
    try:
        report = client.check_sanity(photos, method=CHEAP, timeout=300)
    finally:
        done.set()
        caller.join()
    return report, before, during, served()


def _same(a, b):
    for x, y in zip(a, b):
        assert x.prediction.best.index == y.prediction.best.index
        for mx, my in zip(x.maps, y.maps):
            np.testing.assert_allclose(mx.raw, my.raw, rtol=1e-4, atol=1e-5)


def test_verdicts_on_the_default_model_agree_with_test_methods(checked):
    report = checked[0]
    assert report.layer == "bn2" and report.threshold == pytest.approx(0.5)
    assert [s.name for s in report.stages] == ["head", "head + 2", "head + 4", "head + 8"]
    assert report.stages[report.verdict_stage].modules == ("classifier", "bn2", "conv_head")
    assert [m.method for m in report.methods] == list(CHEAP)
    for m in report.methods:
        assert len(m.randomisation) == 4
        expected = m.method not in INSENSITIVE and m.method != "random"
        assert m.randomisation_passed == expected, m
    # The random baseline ignores the model and the class: it must fail both checks.
    assert report.method("random").randomisation == (1.0,) * 4
    # Class discrimination: each photo's top class against its middle-ranked class.
    assert [top for top, _ in report.classes] == [285, 967]  # Egyptian cat, espresso
    assert all(other not in (285, 967) for _, other in report.classes)
    verdicts = {m.method: m.discrimination_passed for m in report.methods}
    assert verdicts["gradcam"] and verdicts["xgradcam"] and verdicts["hirescam"]
    assert not verdicts["eigencam"] and not verdicts["random"]  # class-agnostic
    assert report.method("eigencam").discrimination == pytest.approx(1.0)


def test_the_served_model_is_unchanged_during_and_after(checked):
    _, before, during, after = checked
    assert during, "no Explain call ran during the check"
    for answer in [*during, after]:
        _same(before, answer)


def test_the_rpc_reports_what_the_engine_measures(checked, photos):
    """The server's figures are engine/sanity.py's on the same pixels and seed."""
    report = checked[0]
    plan = SanityPlan(methods=CHEAP, layer="bn2", contrast_rank=500)
    local = sanity.check(load_model(ModelSpec()), photos, plan)
    assert local.classes == report.classes
    for ours, theirs in zip(local.methods, report.methods):
        np.testing.assert_allclose(ours.randomisation, theirs.randomisation, atol=0.02)
        assert ours.discrimination == pytest.approx(theirs.discrimination, abs=0.02)
        assert ours.randomisation_pass == theirs.randomisation_passed


# --- the copy ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_model(ModelSpec(source=TINY, fold_batchnorm=False))  # its modules as built


def test_the_randomised_copy_shares_only_what_it_keeps(tiny):
    served = {k: v.clone() for k, v in tiny.module.state_dict().items()}
    engine = Engine(tiny)  # the served engine's hooks must not be copied
    try:
        copy = sanity.randomised_copy(tiny, ("head", "features.1"))
        sanity.randomise(copy.module, ("head", "features.1"))
        mine, theirs = dict(copy.module.named_modules()), dict(tiny.module.named_modules())
        assert mine["stem.0"].weight is theirs["stem.0"].weight
        assert mine["head"].weight is not theirs["head"].weight
        assert not torch.equal(mine["head"].weight, theirs["head"].weight)
        assert not torch.equal(mine["features.1"].running_var, theirs["features.1"].running_var)
        assert not any(m._forward_hooks for m in copy.module.modules())
        assert theirs["features"]._forward_hooks  # the served engine's hook stays
    finally:
        engine.close()
    for name, value in tiny.module.state_dict().items():
        assert torch.equal(value, served[name]), name


def test_one_check_at_a_time_and_a_stop_ends_it(tiny):
    checker = sanity.SanityChecker(tiny)
    pixels = [np.full((224, 224, 3), 90, np.uint8)]
    plan = SanityPlan(methods=("gradcam",), layer="features")
    inside, release = threading.Event(), threading.Event()
    answers = []
    finished = threading.Event()

    def stop():
        inside.set()
        release.wait(30)
        return DeadlineExceeded("the deadline passed")

    checker.start(pixels, plan, stop, lambda a: (answers.append(a), finished.set()))
    assert inside.wait(30)
    with pytest.raises(ResourceExhausted):
        checker.start(pixels, plan, lambda: None, answers.append)
    release.set()
    assert finished.wait(30)
    assert isinstance(answers[0], DeadlineExceeded)
    finished.clear()
    checker.start(pixels, plan, lambda: None, lambda a: (answers.append(a), finished.set()))
    assert finished.wait(60)
    assert answers[1].method("gradcam").randomisation


def test_a_check_asks_to_stop_before_every_slice_and_ends_there(monkeypatch):
    """Between two asks of ``stop`` at most one slice runs (a batch of SANITY_BATCH images, or
    SLICE_FORWARDS images of a Score-CAM job); once it answers an error, nothing more runs."""
    monkeypatch.setattr(tiny_models.SlowNet, "delay_s", 0.0)
    monkeypatch.setattr(tiny_models.SlowNet, "batches", [])
    model = load_model(ModelSpec(source=SLOW, fold_batchnorm=False))
    forwarded = tiny_models.SlowNet.batches
    pixels = [np.full((224, 224, 3), 10 * i, np.uint8) for i in range(12)]
    plan = SanityPlan(methods=("gradcam", "scorecam"), layer="features", score_cam_channels=16,
                      stages=2)
    between, seen = [], [0]

    def stop():
        between.append(sum(forwarded[seen[0]:]))
        seen[0] = len(forwarded)
        return DeadlineExceeded("the deadline passed") if len(between) == 40 else None

    with pytest.raises(DeadlineExceeded):
        sanity.check(model, pixels, plan, stop)
    assert len(between) == 40 and max(between) <= max(SLICE_FORWARDS, sanity.SANITY_BATCH)
    assert len(forwarded) == seen[0]  # nothing ran after the stop
    checker = sanity.SanityChecker(model)  # and a stopped check frees the slot
    finished = threading.Event()
    answers = []
    checker.start(pixels[:1], plan, lambda: DeadlineExceeded("passed"),
                  lambda a: (answers.append(a), finished.set()))
    assert finished.wait(30) and isinstance(answers[0], DeadlineExceeded)
    assert checker.close(30) and not checker.busy()


# --- malformed requests --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_server():
    with running(model=TINY, max_item_cost=60, max_images_per_request=4,
                 max_score_cam_channels=8) as pair:
        yield pair


def _image(pixels):
    return pb.Image(raw=pb.RawImage(pixels=pixels.tobytes(), height=pixels.shape[0],
                                    width=pixels.shape[1], channels=3))


GREY = np.full((32, 32, 3), 128, np.uint8)


@pytest.mark.parametrize("fields, wording", [
    ({"images": []}, "no images"),
    ({"images": [pb.Image()]}, "images[0] is empty"),
    ({"images": [_image(GREY)] * 5}, "at most 4"),
    ({"methods": [99]}, "methods[0] is 99, not a CamMethod"),
    ({"layer": "nope"}, "layer 'nope' is not a layer"),
    ({"contrast_rank": 10}, "contrast_rank 10 is out of range"),
    ({"stages": 5}, "stages must be 1..4"),
    ({"threshold": 1.5}, "threshold must be in (0, 1]"),
    ({"threshold": -0.1}, "threshold must be in (0, 1]"),
    ({"threshold": float("nan")}, "threshold must be in (0, 1]"),
    ({"methods": [pb.CAM_METHOD_SCORECAM], "score_cam_channels": 9}, "max_score_cam_channels"),
    ({"images": [_image(GREY)] * 4, "methods": [pb.CAM_METHOD_SCORECAM]},
     "max_item_cost"),
])
def test_malformed_requests(small_server, fields, wording):
    _, client = small_server
    request = pb.CheckSanityRequest(**{"images": [_image(GREY)], **fields})
    with pytest.raises(grpc.RpcError) as caught:
        client._stub.CheckSanity(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert wording in caught.value.details()


def test_the_client_checks_its_options_and_the_tiny_model_answers(small_server):
    _, client = small_server
    with pytest.raises(CamserveError) as caught:
        client.check_sanity([GREY], method="nope")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(CamserveError):
        client.check_sanity([GREY], stages=-1)
    report = client.check_sanity([GREY], method=["gradcam", "eigencam"], stages=1, seed=3)
    assert [s.name for s in report.stages] == ["head"] and report.verdict_stage == 0
    assert report.seed == 3 and len(report.classes) == 1
    # Only the head randomised: EigenCAM, which never looks past the layer, cannot change.
    assert report.method("eigencam").randomisation == (1.0,)
    assert not report.method("eigencam").randomisation_passed


# --- the CLI -------------------------------------------------------------------------------------


def test_cli_prints_the_table(small_server, cat_path, coffee_path, capsys):
    server, _ = small_server
    code = cli_main(["--target", f"127.0.0.1:{server.port}", "evaluate", "--sanity",
                     str(cat_path), str(coffee_path.parent), "--method", "gradcam",
                     "--method", "random", "--stages", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 images" in out and "head + 2*" in out  # the folder holds both photos
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("gradcam", "random")}
    assert rows["random"][3:] == ["FAIL", "1.00", "FAIL"]  # head, head + 2, verdicts
    assert rows["gradcam"][3] == "pass"


def test_cli_prints_the_unlikely_class_note(default_server, cat_path, tmp_path, capsys):
    server, _ = default_server
    code = cli_main(["--target", f"127.0.0.1:{server.port}", "explain", str(cat_path), "-o",
                     str(tmp_path), "--class", "espresso"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "note: 'espresso' has probability" in out and "does not see that class" in out

