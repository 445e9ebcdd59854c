"""The contract between the model repository and model implementations (Triton's backend API, typed).

A :class:`ModelBackend` plugin (``backend:`` in a model YAML) turns a :class:`ModelSpec` into a loaded
:class:`Model`. The server never calls a model directly: a batching policy
(:mod:`pagedserve.batching`) queues requests and calls :meth:`Model.execute` with a batch.
"""

from __future__ import annotations

import abc
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from pagedserve.inference import InferenceRequest

if TYPE_CHECKING:
    from google.protobuf.message import Message
    from pagedserve.chat_template import ChatTemplate
    from pagedserve.in_process import InProcessClient
    from pagedserve.protocol import model_config_pb2
    from pagedserve.settings import BackendSettings


@dataclass(frozen=True)
class ModelSpec:
    """One model of the repository: its (auto-completed) config and the versions it provides."""

    name: str
    config: model_config_pb2.ModelConfig
    versions: tuple[int, ...] = (1,)
    source: Path | None = None
    """The YAML file it came from (relative paths in the config resolve against its folder)."""

    @functools.cached_property
    def output_datatypes(self) -> dict[str, str]:
        """Protocol datatype of each declared output."""
        from pagedserve.datatypes import of_tensor

        return {output.name: of_tensor(output) for output in self.config.output}

    @property
    def decoupled(self) -> bool:
        return self.config.model_transaction_policy.decoupled

    def parameter(self, key: str, default: str | None = None) -> str | None:
        """A string from the config's ``parameters`` map."""
        if key in self.config.parameters:
            return self.config.parameters[key].string_value
        return default

    @property
    def folder(self) -> Path:
        """Where the model's files live: the folder of its YAML (the working directory for a spec
        built in code)."""
        return self.source.parent if self.source is not None else Path.cwd()

    def model_file(self, name: str, what: str) -> Path:
        """``name`` (relative to :attr:`folder`) as a path that stays inside the folder once symlinks
        are resolved; a ``ValueError`` naming ``what`` (the config field) otherwise. Every file a
        backend reads on the config's say goes through here, so no config reaches the rest of the
        disk."""
        root = self.folder.resolve()
        try:
            path = (root / name).resolve()
        except (OSError, ValueError) as error:  # embedded NUL, name too long, symlink loop
            raise ValueError(f"model '{self.name}': {what} '{name}' is not a usable path: {error}") from None
        if not path.is_relative_to(root):
            raise ValueError(
                f"model '{self.name}': {what} '{name}' is outside the model repository {root}; model files "
                "must be inside it (after following symlinks)"
            )
        return path


@dataclass(frozen=True)
class LoadContext:
    """What a backend gets besides the spec when it loads one version."""

    version: int
    settings: BackendSettings
    extras: dict[str, object] = field(default_factory=dict)
    client: InProcessClient | None = None
    """Requests to the other loaded models (ensembles, BLS); None where a model is built alone."""


class Model(abc.ABC):
    """A loaded model version."""

    @abc.abstractmethod
    def execute(self, requests: list[InferenceRequest]) -> None:
        """Run a batch. Every request must eventually get a final response through its responder,
        from this call or later (decoupled models may answer from their own threads). Called from a
        worker thread; never from the server's event loop."""

    def finalize(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release resources; called once after the last execute returned and all requests finished."""

    def memory_bytes(self) -> dict[str, int]:
        """Memory held per kind (``CPU``, ``GPU``), for ModelStatistics.memory_usage."""
        return {}

    def chat_template(self) -> ChatTemplate | None:
        """The chat template that turns OpenAI chat messages into this model's prompt, if it has one."""
        return None

    def failure(self) -> str | None:
        """Why this loaded model can no longer serve at all (its engine died and could not be
        restarted...), or None. The version then shows UNAVAILABLE with this reason until reloaded."""
        return None


class ModelBackend(abc.ABC):
    """A plugin that loads models of one kind (``python``, ``torchscript``, ``llm``...)."""

    name: ClassVar[str]

    @classmethod  # noqa: B027 - optional hook; most backends have nothing to add
    def auto_complete(cls, config: model_config_pb2.ModelConfig) -> None:
        """Fill in what the backend knows (default inputs/outputs, decoupled...), like Triton's
        auto-complete; raise ``ValueError`` naming the bad field for a config it cannot serve."""

    @abc.abstractmethod
    def load(self, spec: ModelSpec, context: LoadContext) -> Model:
        """Load one version; raise an exception whose text becomes the version's UNAVAILABLE reason."""


def enum_name(message: Message, field_name: str) -> str:
    """The symbolic name of an enum field (``KIND_GPU``, ``TYPE_INT32``...), whichever generated module
    built the message."""
    enum = message.DESCRIPTOR.fields_by_name[field_name].enum_type
    return enum.values_by_number[getattr(message, field_name)].name


def instance_count(spec: ModelSpec) -> int:
    """Total instances over all instance groups; a group's count of 0 means Triton's default of 1."""
    groups = spec.config.instance_group
    return sum(max(group.count, 1) for group in groups) if groups else 1
