"""The model repository on disk, in the layout Triton's users know (torch-free):

```
REPO/NAME/config.toml          source = "torchvision:resnet18", and the keys below
REPO/NAME/VERSION/weights.pth  VERSION a positive integer (TorchScript: model.pt)
```

``config.toml`` keys (all but ``source`` optional; docs/models.md is the users' page):

- ``source``: any ``--model`` source; ``weights``: the file in each version folder (default
  ``weights.pth``, or ``model.pt`` for ``torchscript:``; ``"none"``: the source's own, so the
  default model needs no file), ``layers``, ``labels`` (a file relative to ``NAME/``),
  ``input_size`` ([height, width]), ``mean``, ``std``, ``fold_batchnorm``, ``static_padding``,
  ``output_activation``: as the server flags of the same names;
- ``max_batch_size``, ``max_delay_ms``, ``max_queue``, ``device``, ``precision``: this model's
  own, else the server's;
- ``version_policy``: ``"latest"`` (the default: the highest version), ``"latest:N"``,
  ``"all"``, or a list of version numbers.

``--model SOURCE`` is a repository of one: a model named ``--oip-model-name`` at version 1,
built from the server's own flags.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from ..engine.spec import DEFAULT_MODEL, ModelSpec
from ..errors import InvalidArgument, NotFound

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9 and 3.10
    import tomli as tomllib

CONFIG = "config.toml"
WEIGHTS = "weights.pth"
TORCHSCRIPT_WEIGHTS = "model.pt"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")  # a folder name; no paths, no ".."

SPEC_KEYS = ("source", "layers", "labels", "input_size", "mean", "std", "fold_batchnorm",
             "static_padding", "output_activation")


@dataclass(frozen=True)
class Serving:
    """How one model is batched and where it runs: the server's flags unless its config says."""

    max_batch_size: int
    max_delay_ms: float
    max_queue: int
    device: str
    precision: str


KEYS = SPEC_KEYS + tuple(f.name for f in fields(Serving)) + ("weights", "version_policy")


@dataclass(frozen=True)
class ModelConfig:
    """One model of the repository: how to build each of its versions."""

    name: str
    spec: ModelSpec  # without weights: each version has its own
    serving: Serving
    weights: Optional[str]  # the file name in each version folder; None: the source's own
    policy: Tuple[str, int]  # ("latest", N), ("all", 0) or ("specific", 0) with `versions`
    versions: Tuple[int, ...] = ()  # the "specific" policy's
    folder: Optional[Path] = None  # NAME/ in the repository; None: the repository of one

    def spec_of(self, version: int) -> ModelSpec:
        """The spec of one version: the config's, with that version's weights file."""
        file = self.weights_file(version)
        if file is None:
            return self.spec
        path = str(file)
        if is_torchscript(self.spec.source):
            return replace(self.spec, source="torchscript:" + path)
        return replace(self.spec, weights=path)

    def weights_file(self, version: int) -> Optional[Path]:
        """The version's weights file; None when the source brings its own."""
        if self.folder is None or self.weights is None:
            return None
        return self.folder / str(version) / self.weights

    def on_disk(self) -> Tuple[int, ...]:
        """The version folders there are, in order (the repository of one: version 1)."""
        if self.folder is None:
            return (1,)
        try:
            entries = list(self.folder.iterdir())
        except OSError:
            return ()
        return tuple(sorted(int(e.name) for e in entries
                            if e.is_dir() and e.name.isdigit() and int(e.name) > 0))

    def served(self) -> Tuple[int, ...]:
        """The versions the policy serves of those on disk."""
        there = self.on_disk()
        kind, n = self.policy
        if kind == "all":
            return there
        if kind == "specific":
            return tuple(v for v in self.versions if v in there)
        return there[-n:] if there else ()


def is_torchscript(source: str) -> bool:
    return source == "torchscript" or source.startswith("torchscript:")


def check_name(name: str, field: str = "name") -> str:
    """A model's name as a request gives it: a folder name of the repository, nothing else."""
    if not NAME.fullmatch(name or "") or ".." in name:
        raise InvalidArgument(
            f"{name!r} is not a model name: a name is a folder of the repository (letters, "
            "digits, '.', '_' and '-', no paths)", field=field, reason="BAD_MODEL_NAME")
    return name


def _policy(value: Any, where: str) -> Tuple[Tuple[str, int], Tuple[int, ...]]:
    if isinstance(value, list):
        if not value or not all(isinstance(v, int) and v > 0 for v in value):
            raise ValueError(f"{where}: version_policy's list must hold positive version "
                             f"numbers, not {value!r}")
        return ("specific", 0), tuple(sorted(set(value)))
    text = str(value).strip().lower()
    if text == "all":
        return ("all", 0), ()
    if text == "latest":
        return ("latest", 1), ()
    match = re.fullmatch(r"latest:(\d+)", text)
    if match and int(match.group(1)) > 0:
        return ("latest", int(match.group(1))), ()
    raise ValueError(f"{where}: version_policy must be \"latest\", \"latest:N\", \"all\" or a "
                     f"list of versions, not {value!r}")


def _pair(value: Any, key: str, where: str, size: int, kind: type) -> tuple:
    if (not isinstance(value, list) or len(value) != size
            or not all(isinstance(v, (int, float)) for v in value)):
        raise ValueError(f"{where}: {key} must be a list of {size} numbers, not {value!r}")
    return tuple(kind(v) for v in value)


def read_config(folder: Path, serving: Serving) -> ModelConfig:
    """The config of ``REPO/NAME``; raises ValueError saying what is wrong and where."""
    where = str(folder / CONFIG)
    try:
        with open(folder / CONFIG, "rb") as f:
            raw = tomllib.load(f)
    except FileNotFoundError:
        raise ValueError(f"{where} is missing: a model folder needs one (source = ...)") \
            from None
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{where} cannot be read: {exc}") from None
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)}; the keys are {', '.join(KEYS)}")
    if not isinstance(raw.get("source"), str) or not raw["source"]:
        raise ValueError(f"{where}: source is missing (e.g. source = \"torchvision:resnet18\")")
    spec: Dict[str, Any] = {"source": raw["source"]}
    if "layers" in raw:
        layers = raw["layers"]
        if isinstance(layers, str):
            layers = [layers]
        if not isinstance(layers, list) or not all(isinstance(x, str) and x for x in layers):
            raise ValueError(f"{where}: layers must be a list of module names")
        spec["layers"] = tuple(layers)
    if "labels" in raw:
        labels = folder / str(raw["labels"])
        if not labels.is_file():
            raise ValueError(f"{where}: labels file {labels} does not exist")
        spec["labels"] = str(labels)
    if "input_size" in raw:
        spec["input_size"] = _pair(raw["input_size"], "input_size", where, 2, int)
    for key in ("mean", "std"):
        if key in raw:
            spec[key] = _pair(raw[key], key, where, 3, float)
    for key in ("fold_batchnorm", "static_padding"):
        if key in raw:
            if not isinstance(raw[key], bool):
                raise ValueError(f"{where}: {key} must be true or false")
            spec[key] = raw[key]
    if "output_activation" in raw:
        if raw["output_activation"] not in ("softmax", "sigmoid", "embedding"):
            raise ValueError(f"{where}: output_activation must be softmax, sigmoid or "
                             "embedding")
        spec["output_activation"] = raw["output_activation"]
    own = {}
    for f in fields(Serving):
        if f.name in raw:
            value = raw[f.name]
            wanted = (int, float) if f.type == "float" else (
                int if f.type == "int" else str)
            if isinstance(value, bool) or not isinstance(value, wanted):
                raise ValueError(f"{where}: {f.name} must be a {f.type}, not {value!r}")
            own[f.name] = value
    torchscript = is_torchscript(raw["source"])
    default = raw["source"].partition(":")[2] or TORCHSCRIPT_WEIGHTS if torchscript else WEIGHTS
    weights = raw.get("weights", default)
    if raw["source"] == DEFAULT_MODEL and "weights" not in raw:
        weights = "none"  # the default model: its weights come from its package
    if not isinstance(weights, str) or "/" in weights or weights in ("", ".", ".."):
        raise ValueError(f"{where}: weights must be a file name in the version folder")
    if torchscript and weights == "none":
        raise ValueError(f"{where}: a TorchScript model needs its file in each version folder")
    policy, versions = _policy(raw.get("version_policy", "latest"), where)
    config = ModelConfig(
        name=folder.name, spec=replace(ModelSpec(), **spec), serving=replace(serving, **own),
        weights=None if weights == "none" else weights, policy=policy, versions=versions,
        folder=folder)
    return config


class Repository:
    """The models of ``--model-repository`` (or the repository of one), read on demand: a
    config is read again whenever a model is (re)loaded, so an edit takes effect then."""

    def __init__(self, root: Optional[Path], base: ModelSpec, serving: Serving,
                 single_name: str) -> None:
        """``base``: the repository of one's model (``--model`` and its flags); ``serving``:
        the server's batching and placement, each model's unless its config says."""
        self.root = root
        self._serving = serving
        self._single = ModelConfig(name=single_name, spec=base, serving=serving,
                                   weights=None, policy=("latest", 1)) if root is None else None

    def names(self) -> List[str]:
        """The model folders (those that hold a config.toml, or look like models), by name."""
        if self._single is not None:
            return [self._single.name]
        return sorted(e.name for e in self.root.iterdir()
                      if e.is_dir() and NAME.fullmatch(e.name) and (e / CONFIG).exists())

    def config(self, name: str) -> ModelConfig:
        """The model's config; NotFound for a name the repository lacks, ValueError for a
        config that is wrong."""
        check_name(name)
        if self._single is not None:
            if name != self._single.name:
                raise NotFound(f"model {name!r} is not in this server's repository; it serves "
                               f"{self._single.name!r}", field="name", reason="UNKNOWN_MODEL")
            return self._single
        folder = self.root / name
        if not (folder / CONFIG).exists():
            raise NotFound(f"model {name!r} is not in the repository {self.root} (it has "
                           f"{', '.join(self.names()) or 'no models'})", field="name",
                           reason="UNKNOWN_MODEL")
        return read_config(folder, self._serving)
