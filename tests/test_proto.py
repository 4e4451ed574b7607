"""The committed gRPC code is what the pinned generator makes of the .proto, it loads on the
installed protobuf and grpcio without complaint, the .proto documents everything, and Buf's
linter (STANDARD and COMMENTS rules, buf.yaml) passes on it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTO = "camserve/v1/camserve.proto"
FLOOR = ROOT / "tests/compat/floor.txt"
# The distributions whose oldest supported versions tests/compat/floor.txt pins.
FLOORED = ("grpcio", "protobuf", "grpcio-status", "googleapis-common-protos",
           "grpcio-health-checking", "grpcio-reflection")


@pytest.fixture(scope="module")
def generator(tmp_path_factory):
    """`make proto-check`: the pinned generator (its venv is made on first use) regenerates the
    code and compares it with the committed code; it also writes the .proto's descriptors."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make not found")
    descriptors = tmp_path_factory.mktemp("proto") / "set.pb"
    done = subprocess.run([make, "-s", "-C", str(ROOT), "proto-check",
                           f"PROTO_DESCRIPTOR_SET={descriptors}"],
                          capture_output=True, text=True, timeout=600)
    return done, descriptors


def test_generated_code_is_fresh(generator):
    done, _ = generator
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_rpc_message_field_and_enum_value_has_a_comment(generator):
    from google.protobuf import descriptor_pb2

    done, descriptors = generator
    assert descriptors.exists(), f"the generator failed: {done.stdout}{done.stderr}"
    files = descriptor_pb2.FileDescriptorSet.FromString(descriptors.read_bytes())
    source = next(f for f in files.file if f.name == PROTO)
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


def test_generated_code_loads_without_warnings_on_this_protobuf_and_grpcio():
    """No version check fails or warns, and every message survives a round trip."""
    script = textwrap.dedent("""
        import warnings
        warnings.simplefilter("error")
        import grpc
        from google.protobuf import __version__ as protobuf
        from camserve.v1 import camserve_pb2, camserve_pb2_grpc
        for name, message in camserve_pb2.DESCRIPTOR.message_types_by_name.items():
            cls = getattr(camserve_pb2, name)
            assert cls.FromString(cls().SerializeToString()) == cls(), name
        services = camserve_pb2.DESCRIPTOR.services_by_name
        assert services and all(hasattr(camserve_pb2_grpc, s + "Stub") for s in services)
        print("protobuf", protobuf, "grpcio", grpc.__version__)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def _declared_floors() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + project["optional-dependencies"]["server"]
    floors = {}
    for requirement in requirements:
        found = re.match(r"([A-Za-z0-9._-]+)\s*(?:\[[^]]*\])?\s*(.*)", requirement)
        name, spec = found.group(1).lower(), found.group(2)
        low = re.search(r">=\s*([0-9][0-9.]*)", spec)
        if name in FLOORED:
            assert low, f"pyproject.toml: {requirement!r} has no floor"
            floors[name] = low.group(1)
    return floors


def _tested_floors() -> dict:
    pins = {}
    for line in FLOOR.read_text().splitlines():
        found = re.match(r"\s*([A-Za-z0-9._-]+)\s*==\s*([0-9][0-9.]*)", line)
        if found:
            pins[found.group(1).lower()] = found.group(2)
    return pins


def test_compat_run_tests_exactly_the_declared_floors():
    """`make test-compat` installs tests/compat/floor.txt: what pyproject.toml promises."""
    declared, tested = _declared_floors(), _tested_floors()
    assert set(declared) == set(FLOORED)
    assert {name: tested.get(name) for name in declared} == declared, (
        f"pyproject.toml's floors {declared} differ from {FLOOR.relative_to(ROOT)}'s pins")


def _version(text: str) -> tuple:
    return tuple(int(part) for part in text.split("."))


def test_generated_code_needs_no_newer_protobuf_or_grpcio_than_the_floors():
    """Newer generators write version checks into the code: they must not exceed the floors."""
    floors = _declared_floors()
    v1 = ROOT / "client/camserve/v1"
    pb2 = (v1 / "camserve_pb2.py").read_text()
    pb2_grpc = (v1 / "camserve_pb2_grpc.py").read_text()
    check = re.search(r"ValidateProtobufRuntimeVersion\(\s*[\w.]+,\s*(\d+),\s*(\d+),\s*(\d+)", pb2)
    if check:
        assert _version(".".join(check.groups())) <= _version(floors["protobuf"])
    grpc_check = re.search(r"GRPC_GENERATED_VERSION\s*=\s*'([0-9.]+)'", pb2_grpc)
    if grpc_check:
        assert _version(grpc_check.group(1)) <= _version(floors["grpcio"])


def _buf() -> str:
    """Buf's CLI (the dev extra's buf-bin installs it beside this Python)."""
    beside = Path(sys.executable).parent / "buf"
    found = str(beside) if beside.exists() else shutil.which("buf")
    if found is None:
        pytest.skip("buf is not installed: pip install buf-bin (the dev extra has it)")
    return found


def _buf_workspace(root: Path) -> Path:
    """buf.yaml and protos/ as `make lint` sees them, google/rpc/status.proto from
    googleapis-common-protos in build/buf-deps."""
    import google.rpc

    shutil.copy(ROOT / "buf.yaml", root / "buf.yaml")
    shutil.copytree(ROOT / "protos", root / "protos")
    deps = root / "build/buf-deps/google/rpc"
    deps.mkdir(parents=True)
    shutil.copy(Path(list(google.rpc.__path__)[0]) / "status.proto", deps)
    return root


def _buf_lint(buf: str, root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([buf, "lint", "--error-format", "json"], cwd=root, capture_output=True,
                          text=True, timeout=120, env=dict(os.environ, BUF_CACHE_DIR=str(
                              root / "cache")))


def test_buf_lint_passes_with_standard_and_comment_rules(tmp_path):
    done = _buf_lint(_buf(), _buf_workspace(tmp_path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_buf_lint_catches_what_the_api_review_found(tmp_path):
    """The linter runs on camserve's .proto with the rules that caught the review's findings
    (a service without the Service suffix, an RPC answering another message, an uncommented
    oneof), and leaves KServe's OIP protos alone."""
    buf = _buf()
    root = _buf_workspace(tmp_path)
    proto = root / "protos" / PROTO
    text = proto.read_text()
    for old, new in (("service CamserveService {", "service Camserve {"),
                     ("returns (GetModelInfoResponse)", "returns (ModelInfo)\n  "),
                     ("  // Exactly one must be set; an Image with neither answers "
                      "INVALID_ARGUMENT.\n", "")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    proto.write_text(text + "\n// Stands for the old GetModelInfo answer.\nmessage ModelInfo {}\n")
    done = _buf_lint(buf, root)
    assert done.returncode != 0
    found = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert {f["path"] for f in found} == {f"protos/{PROTO}"}, found
    rules = {f["type"] for f in found}
    assert {"SERVICE_SUFFIX", "RPC_RESPONSE_STANDARD_NAME", "COMMENT_ONEOF"} <= rules, rules


# Words that generators for C++, Java, C#, Go, JavaScript or Python rename (protoc's C++
# generator turns `signed` into `signed_()`): no field, enum value or message may use one.
KEYWORDS = set("""alignas alignof and asm auto bool break case catch char class const constexpr
continue default delete do double else enum explicit export extern false float for friend goto
if inline int long mutable namespace new noexcept not nullptr operator or private protected
public register return short signed sizeof static struct switch template this throw true try
typedef typeid typename union unsigned using virtual void volatile while abstract boolean byte
extends final finally implements import instanceof interface native package super synchronized
throws transient base checked decimal event fixed implicit in internal is lock object out
override params readonly ref sbyte sealed stackalloc string uint ulong unchecked unsafe ushort
chan defer fallthrough func go map range select type var await function let yield def del elif
except from global lambda nonlocal pass raise with""".split())


def test_the_api_is_usable_from_other_languages():
    """Go, Java and C# generators need their options (protoc-gen-go refuses a file without
    go_package), and no name may be a keyword there."""
    from camserve.v1 import camserve_pb2

    options = camserve_pb2.DESCRIPTOR.GetOptions()
    assert options.go_package.split(";")[-1] == "camservev1"
    assert options.java_package and options.java_multiple_files and options.csharp_namespace
    names = []
    for message in camserve_pb2.DESCRIPTOR.message_types_by_name.values():
        names += [message.name] + [f.name for f in message.fields]
        names += [o.name for o in message.oneofs]
    for enum in camserve_pb2.DESCRIPTOR.enum_types_by_name.values():
        names += [enum.name] + [v.name.lower() for v in enum.values]
    clashes = sorted({n for n in names if n.lower() in KEYWORDS})
    assert not clashes, f"rename these in {PROTO}: {clashes}"
    assert "keep_sign" in names


def test_one_options_message_per_call_kind_and_no_singular_plural_pairs():
    """Unary requests and stream configs share PredictOptions / ExplainOptions (a field added to
    one copy and not the other became an INTERNAL error), and no message has both `x` and
    `xs` (target/targets, method/methods, layer/layers)."""
    from camserve.v1 import camserve_pb2 as pb

    for holder, options in ((pb.PredictRequest, pb.PredictOptions),
                            (pb.StreamPredictConfig, pb.PredictOptions),
                            (pb.ExplainRequest, pb.ExplainOptions),
                            (pb.StreamExplainConfig, pb.ExplainOptions)):
        assert holder.DESCRIPTOR.fields_by_name["options"].message_type is options.DESCRIPTOR
    for name, message in pb.DESCRIPTOR.message_types_by_name.items():
        fields = set(message.fields_by_name)
        assert not {f for f in fields if f + "s" in fields}, name
