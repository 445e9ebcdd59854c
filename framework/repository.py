"""The model repository: a folder of YAML files, one per model, each a Triton ``ModelConfig``.

A YAML holds the fields of Triton's ``config.pbtxt`` in protobuf-JSON shape (``max_batch_size``,
``input``, ``output``, ``dynamic_batching``...) plus two pagedserve keys:

* ``versions``: the versions this model provides (default ``[1]``); a YAML has no version folders.
* ``autoload``: default true; false keeps a model that needs external files (real weights) out of
  the "load everything" start-up of ``model_control_mode=none|poll`` unless ``model=`` names it.

``parameters`` values may be plain scalars (``key: value``), shorthand for ``{string_value: value}``.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import json_format
from pagedserve.backend import ModelSpec
from pagedserve.errors import InferenceError
from pagedserve.protocol import model_config_pb2

_TRAVERSAL = re.compile(r"(^|[/\\])\.\.([/\\]|$)|[/\\]")


def check_model_name(name: str) -> None:
    if not name.strip():
        raise InferenceError("Model name cannot be empty. Please enter a valid name to deploy.")
    if _TRAVERSAL.search(name) or name in (".", ".."):
        raise InferenceError("model name must not contain path traversal characters")


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
                document = yaml.safe_load(self.file_for(name).read_text()) or {}
            except yaml.YAMLError:
                document = {}  # a broken file still gets loaded, so its error shows up in the table
            if not isinstance(document, dict) or document.get("autoload", True) is not False:
                names.append(name)
        return names

    def file_for(self, name: str) -> Path:
        check_model_name(name)
        path = self.path / f"{name}.yaml"
        if not path.is_file():
            raise InferenceError(
                f"failed to load '{name}', failed to poll from model repository", grpc.StatusCode.INTERNAL
            )
        return path

    def read(self, name: str, override_json: str | None = None) -> ModelSpec:
        """Parse ``name``'s YAML; ``override_json`` (a protobuf-JSON ModelConfig from a load request)
        replaces the top-level fields it names."""
        path = self.file_for(name)
        try:
            document = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: invalid YAML: {error}") from None
        if not isinstance(document, dict):
            raise ValueError(f"{path}: expected a mapping of ModelConfig fields")
        if override_json is not None:
            document = _apply_override(document, override_json)
        return spec_from_document(name, document, path)


def _apply_override(document: dict[str, Any], override_json: str) -> dict[str, Any]:
    try:
        override = json.loads(override_json)
    except json.JSONDecodeError as error:
        raise ValueError(f"failed to parse config override: {error}") from None
    if not isinstance(override, dict):
        raise ValueError("config override must be a JSON object of ModelConfig fields")
    merged = copy.deepcopy(document)
    merged.update(override)
    return merged


def spec_from_document(name: str, document: dict[str, Any], source: Path | None = None) -> ModelSpec:
    document = dict(document)
    versions = document.pop("versions", [1])
    document.pop("autoload", None)
    if not isinstance(versions, list) or not all(isinstance(v, int) and v > 0 for v in versions):
        raise ValueError(f"model '{name}': 'versions' must be a list of positive integers, got {versions!r}")
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
