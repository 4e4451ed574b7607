"""The committed gRPC code is what the .proto generates, and the .proto documents everything."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = "camserve/v1/camserve.proto"
GENERATED = ("camserve_pb2.py", "camserve_pb2.pyi", "camserve_pb2_grpc.py")


def _protoc(*args):
    grpc_tools = pytest.importorskip("grpc_tools.protoc", reason="grpcio-tools not installed")
    include = str(Path(grpc_tools.__file__).parent / "_proto")
    assert grpc_tools.main(["protoc", f"-I{ROOT / 'protos'}", f"-I{include}", *args]) == 0


def test_generated_code_is_fresh(tmp_path):
    _protoc(f"--python_out={tmp_path}", f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}", PROTO)
    stale = [name for name in GENERATED
             if not filecmp.cmp(tmp_path / "camserve/v1" / name,
                                ROOT / "client/camserve/v1" / name, shallow=False)]
    assert not stale, f"generated code is stale, run `make proto`: {stale}"


def test_every_rpc_message_field_and_enum_value_has_a_comment(tmp_path):
    from google.protobuf import descriptor_pb2

    out = tmp_path / "set.pb"
    _protoc(f"--descriptor_set_out={out}", "--include_source_info", PROTO)
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())
    source = files.file[0]
    commented = {tuple(loc.path) for loc in source.source_code_info.location
                 if loc.leading_comments.strip() or loc.trailing_comments.strip()}
    missing = []
    for m, message in enumerate(source.message_type):
        if message.field and (4, m) not in commented:
            missing.append(message.name)
        for f, field in enumerate(message.field):
            if (4, m, 2, f) not in commented:
                missing.append(f"{message.name}.{field.name}")
    for e, enum in enumerate(source.enum_type):
        if (5, e) not in commented:
            missing.append(enum.name)
        for v, value in enumerate(enum.value):
            if (5, e, 2, v) not in commented:
                missing.append(value.name)
    for s, service in enumerate(source.service):
        for r, method in enumerate(service.method):
            if (6, s, 2, r) not in commented:
                missing.append(f"{service.name}.{method.name}")
    assert not missing, f"document these in {PROTO}: {missing}"
