"""Every CamserveError has a stable reason from one list, camserve.REASONS: the client's own
errors (found before anything is sent) and the server's. The list stays exact: every reason
the code raises is in it, every reason in it is raised somewhere, and docs/client.md lists
them all."""

from __future__ import annotations

import asyncio
import re
import socket
from pathlib import Path

import grpc
import numpy as np
import pytest

import camserve
from camserve import AsyncClient, CamserveError, Client, Frame, reasons
from camserve.errors import invalid

ROOT = Path(__file__).resolve().parents[1]
SOURCES = [ROOT / "server" / "camserve_server", ROOT / "client" / "camserve"]
# A reason literal: `reason="X"` (an error raised with a reason) or `reason = "X"` (an error
# class's own). Reasons are upper case; the batcher's lower-case withdrawal labels
# (`reason = "cancelled"`) name metrics, not errors.
LITERAL = re.compile(r'\breason\s*=\s*"([A-Z][A-Z0-9_]*)"')
CONSTANT = re.compile(r"\breasons\.([A-Z][A-Z0-9_]*)\b")
IMPORTED = re.compile(r"from\s+[\w.]*\breasons\s+import\s+\(?([\w\s,]+)\)?")


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def offline():
    """A client for a port where no server listens: errors found before sending never dial."""
    with Client(f"127.0.0.1:{_closed_port()}", timeout=10, retries=0) as client:
        yield client


def test_client_errors_before_sending_have_reasons(offline, tmp_path):
    """A text file is no such error: the client sends it as it is, and the server refuses it
    (below)."""
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    pixels = np.zeros((8, 8, 3), np.uint8)
    cases = [
        ("missing file", lambda: offline.predict(tmp_path / "missing.jpg"),
         reasons.IMAGE_NOT_FOUND),
        ("a folder", lambda: offline.predict(tmp_path), reasons.INVALID_IMAGE),
        ("empty file", lambda: offline.predict(empty), reasons.INVALID_IMAGE),
        ("float array", lambda: offline.predict(pixels.astype(np.float32)),
         reasons.INVALID_IMAGE),
        ("4-D array", lambda: offline.predict(pixels[None]), reasons.INVALID_IMAGE),
        ("not an image type", lambda: offline.predict(object()), reasons.INVALID_IMAGE),
        ("unknown method", lambda: offline.explain(pixels, method="nope"),
         reasons.UNKNOWN_METHOD),
        ("unknown target kind", lambda: offline.explain(pixels, target_kind="nope"),
         reasons.INVALID_OPTION),
        ("unknown method in a check", lambda: offline.check_sanity([pixels], method="nope"),
         reasons.UNKNOWN_METHOD),
        ("unknown output", lambda: offline.explain(pixels, outputs=("svg",)),
         reasons.UNKNOWN_OUTPUT),
        ("unknown option", lambda: offline.explain(pixels, topp_targets=2),
         reasons.UNKNOWN_OPTION),
        ("top_k 0", lambda: offline.predict(pixels, top_k=0), reasons.INVALID_OPTION),
        ("negative count", lambda: offline.explain(pixels, score_cam_channels=-1),
         reasons.INVALID_OPTION),
        ("negative stages", lambda: offline.check_sanity([pixels], stages=-1),
         reasons.INVALID_OPTION),
        ("float target", lambda: offline.explain(pixels, target=1.5), reasons.INVALID_OPTION),
        ("negative class", lambda: offline.explain(pixels, target=-1), reasons.UNKNOWN_CLASS),
        ("upper-case metadata", lambda: offline.predict(pixels, metadata=[("Key", "v")]),
         reasons.INVALID_METADATA),
        ("unknown policy", lambda: offline.stream_predict([pixels], policy="newest"),
         reasons.UNKNOWN_POLICY),
        ("too large a message", lambda: Client(f"127.0.0.1:{_closed_port()}",
                                               max_message_bytes=1000).predict(
            np.zeros((100, 100, 3), np.uint8)), reasons.MESSAGE_TOO_LARGE),
        ("empty target", lambda: Client(" "), reasons.INVALID_TARGET),
        ("mixed address families", lambda: Client("127.0.0.1:1,[::1]:1"),
         reasons.INVALID_TARGET),
        ("client cert without key", lambda: Client("localhost", client_cert=b"x"),
         reasons.INVALID_TLS),
        ("missing CA file", lambda: Client("localhost", root_certificates=tmp_path / "ca.pem"),
         reasons.INVALID_TLS),
    ]
    for name, call, expected in cases:
        with pytest.raises(CamserveError) as caught:
            call()
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, name
        assert caught.value.reason == expected, (name, caught.value.reason, caught.value)


def test_the_async_client_gives_the_same_reasons(tmp_path):
    async def main():
        async with AsyncClient(f"127.0.0.1:{_closed_port()}", retries=0) as client:
            for call, expected in ((lambda: client.predict(tmp_path / "missing.jpg"),
                                    reasons.IMAGE_NOT_FOUND),
                                   (lambda: client.explain(b"x", method="nope"),
                                    reasons.UNKNOWN_METHOD)):
                with pytest.raises(CamserveError) as caught:
                    await call()
                assert caught.value.reason == expected

    asyncio.run(main())


def test_an_unreachable_server_has_a_reason():
    with Client(f"127.0.0.1:{_closed_port()}", timeout=10, retries=0) as client:
        with pytest.raises(CamserveError) as caught:
            client.model_info()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE
    assert caught.value.reason == reasons.UNREACHABLE
    assert "cannot reach a camserve server" in caught.value.details


def test_the_servers_image_errors_have_reasons(tiny_server, tmp_path):
    """Files the client can read but that are no image reach the server, which says
    INVALID_IMAGE."""
    _, client = tiny_server
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    for image in (text, b"", b"GIF89a" + b"\0" * 4):
        with pytest.raises(CamserveError) as caught:
            client.predict(image)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert caught.value.reason == reasons.INVALID_IMAGE, (image, caught.value)


def test_a_frame_the_client_cannot_send_ends_the_stream_with_a_reason(tiny_server):
    _, client = tiny_server
    pixels = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(CamserveError) as caught:
        list(client.stream_predict([pixels, Frame(pixels, options={"method": "gradcam"})]))
    assert caught.value.reason == reasons.UNKNOWN_OPTION


def test_invalid_needs_a_reason_from_the_list():
    with pytest.raises(TypeError):
        invalid("no reason")  # type: ignore[call-arg]
    with pytest.raises(ValueError):
        invalid("a reason not in the list", "NOT_A_REASON")


def _sources():
    for folder in SOURCES:
        for path in sorted(folder.rglob("*.py")):
            if "v1" in path.relative_to(folder).parts or path.name == "reasons.py":
                continue  # generated code, and the list itself
            yield path, path.read_text()


def test_the_list_of_reasons_is_exact():
    names = {name for name in dir(reasons) if name.isupper() and name != "REASONS"}
    assert names == set(camserve.REASONS), "a constant without a meaning, or the reverse"
    for name, meaning in camserve.REASONS.items():
        assert getattr(reasons, name) == name
        assert meaning.strip() and "\n" not in meaning and "|" not in meaning, name
    used = set()
    for path, text in _sources():
        literals = set(LITERAL.findall(text))
        assert not literals - set(camserve.REASONS), \
            f"{path}: reasons missing from camserve/reasons.py: {literals - set(camserve.REASONS)}"
        constants = set(CONSTANT.findall(text))
        for group in IMPORTED.findall(text):
            constants |= {n.strip() for n in group.split(",") if n.strip().isupper()}
        constants.discard("REASONS")
        assert not constants - set(camserve.REASONS), f"{path}: {constants - names}"
        used |= literals | constants
    assert set(camserve.REASONS) - used == set(), "reasons that nothing raises"


def test_the_docs_list_every_reason():
    page = (ROOT / "docs" / "client.md").read_text()
    section = re.search(r"^## Errors\n(.*?)(?=^## |\Z)", page, re.S | re.M)
    assert section, "docs/client.md has no '## Errors' section"
    rows = dict(re.findall(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|\s*(.*?)\s*\|\s*$",
                           section.group(1), re.M))
    assert rows == camserve.REASONS
