"""The model repository: a folder of YAML files, one per model, each a Triton ``ModelConfig``.

A YAML holds the fields of Triton's ``config.pbtxt`` in protobuf-JSON shape (``max_batch_size``,
``input``, ``output``, ``dynamic_batching``...) plus two pagedserve keys:

* ``versions``: the versions this model provides (default ``[1]``); a YAML has no version folders.
* ``autoload``: default true; false keeps a model that needs external files (real weights) out of
  the "load everything" start-up of ``model_control_mode=none|poll`` unless ``model=`` names it.

``parameters`` values may be plain scalars (``key: value``), shorthand for ``{string_value: value}``.

A load request's config override replaces the top-level fields it names, within the limits of
:mod:`pagedserve.model_config_check`: it may tune a model, not choose its code or files.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format
from pagedserve.backend import ModelSpec
from pagedserve.errors import InferenceError
from pagedserve.model_config_check import MAX_CONFIG_BYTES, MAX_VERSIONS, contain_override, parse_override
from pagedserve.protocol import model_config_pb2

_TRAVERSAL = re.compile(r"(^|[/\\])\.\.([/\\]|$)|[/\\]")
# A name becomes "<name>.yaml" in one directory: stay under the file system's NAME_MAX.
MAX_MODEL_NAME_BYTES = 250
_LISTED_NAMES = 20  # how many of the available models an unknown-model error lists


def check_model_name(name: str) -> None:
    if not name.strip():
        raise InferenceError("Model name cannot be empty. Please enter a valid name to deploy.")
    if _TRAVERSAL.search(name) or name in (".", ".."):
        raise InferenceError("model name must not contain path traversal characters")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_MODEL_NAME_BYTES:
        raise InferenceError(f"model name is longer than {MAX_MODEL_NAME_BYTES} bytes")
    if not name.isprintable():
        raise InferenceError("model name must not contain control characters")


class ModelRepository:
    """Reads model specs from ``path``; knows nothing about loading or backends."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.path.glob("*.yaml"))

    def autoload_names(self) -> list[str]:
        """Models to load when the start-up list is "everything"."""
        names = []
        for name in self.names():
            try:
                document = _load_yaml(self.file_for(name))
            except (ValueError, OSError, InferenceError):
                document = {}  # a broken file still gets loaded, so its error shows up in the table
            if document.get("autoload", True) is not False:
                names.append(name)
        return names

    def file_for(self, name: str) -> Path:
        check_model_name(name)
        path = self.path / f"{name}.yaml"
        if not path.is_file():
            # Triton's words first (clients match them), then what a person needs to fix the name.
            raise InferenceError(
                f"failed to load '{name}', failed to poll from model repository: no {name}.yaml in "
                f"{self.path}; {self._available()}",
                grpc.StatusCode.INTERNAL,
            )
        return path

    def _available(self) -> str:
        if not self.path.is_dir():
            return "that directory does not exist (set repository=<dir>)"
        names = self.names()
        if not names:
            return "it holds no models (*.yaml)"
        more = f" and {len(names) - _LISTED_NAMES} more" if len(names) > _LISTED_NAMES else ""
        return f"models there: {', '.join(names[:_LISTED_NAMES])}{more}"

    def mtime_ns(self, name: str) -> int | None:
        """When ``name``'s YAML last changed (None when it is gone)."""
        try:
            return (self.path / f"{name}.yaml").stat().st_mtime_ns
        except (OSError, ValueError):
            return None

    def read(self, name: str, override_json: str | None = None) -> ModelSpec:
        """Parse ``name``'s YAML; ``override_json`` (a protobuf-JSON ModelConfig from a load request)
        replaces the top-level fields it names, except those that choose code or files."""
        path = self.file_for(name)
        document = _load_yaml(path)
        if override_json is None:
            return spec_from_document(name, document, path)
        override = parse_override(override_json)
        try:
            base = spec_from_document(name, document, path).config
        except ValueError:
            base = model_config_pb2.ModelConfig()  # an override may repair a broken YAML, as in Triton
        try:
            spec = spec_from_document(name, {**document, **override}, path)
        except ValueError as error:
            raise ValueError(f"Invalid config override: {error}") from None
        contain_override(base, spec.config)
        return spec


def _load_yaml(path: Path) -> dict[str, Any]:
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise ValueError(f"{path} is {size} bytes; a model YAML may be at most {MAX_CONFIG_BYTES}")
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: invalid YAML: {_one_line(error)}") from None
    except RecursionError:
        raise ValueError(f"{path}: nested too deeply") from None
    if not isinstance(document, dict):
        raise ValueError(f"{path}: expected a mapping of ModelConfig fields")
    return document


def spec_from_document(name: str, document: dict[str, Any], source: Path | None = None) -> ModelSpec:
    document = dict(document)
    versions = document.pop("versions", [1])
    document.pop("autoload", None)
    if not isinstance(versions, list) or not all(isinstance(v, int) and v > 0 for v in versions):
        raise ValueError(f"model '{name}': 'versions' must be a list of positive integers, got {versions!r}")
    if len(set(versions)) > MAX_VERSIONS:
        raise ValueError(f"model '{name}': 'versions' lists {len(set(versions))}; the limit: {MAX_VERSIONS}")
    if "parameters" in document:
        document["parameters"] = _expand_parameters(document["parameters"])
    config = model_config_pb2.ModelConfig()
    try:
        json_format.ParseDict(document, config)
    except json_format.ParseError as error:
        raise ValueError(f"model '{name}': {error}") from None
    if config.name and config.name != name:
        raise ValueError(f"model '{name}': config name '{config.name}' does not match the file name")
    config.name = name
    return ModelSpec(
        name=name, config=config, versions=tuple(_select_versions(config, versions)), source=source
    )


def _expand_parameters(parameters: Any) -> dict[str, Any]:
    if not isinstance(parameters, dict):
        raise ValueError("'parameters' must be a mapping")
    return {
        key: value if isinstance(value, dict) else {"string_value": _scalar(value)}
        for key, value in parameters.items()
    }


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _select_versions(config: model_config_pb2.ModelConfig, available: list[int]) -> list[int]:
    """Apply the version policy (default: latest one) to the versions the YAML provides."""
    available = sorted(set(available))
    policy = config.version_policy
    kind = policy.WhichOneof("policy_choice")
    if kind == "all":
        return available
    if kind == "specific":
        chosen = [v for v in policy.specific.versions if v in available]
        missing = sorted(set(policy.specific.versions) - set(available))
        if missing:
            raise ValueError(f"version_policy names versions {missing} that the model does not provide")
        return sorted(chosen)
    count = policy.latest.num_versions if kind == "latest" and policy.latest.num_versions else 1
    return available[-count:]


def _one_line(error: yaml.YAMLError) -> str:
    """PyYAML's message spans lines with a drawing of the spot; a model's reason is one line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem
