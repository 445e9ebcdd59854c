"""The ``python`` backend: a model is a plain Python class, as in Triton's Python backend.

The class is named in the model config's ``parameters``: either ``python_class: "pkg.module:Class"``,
or ``python_file: "path/to/file.py"`` (relative to the model YAML's folder, and inside it) with
``python_class: "Class"``. Both come from the repository's YAML only: a config override from the
network may not set them (:mod:`pagedserve.model_config_check`). One object is created per model
instance; its methods are:

* ``initialize(self, args: PythonModelArgs) -> None`` (optional): called once after construction;
* ``execute(self, requests: list[InferenceRequest]) -> list[InferenceResponse] | None``: one response
  per request, in order (non-decoupled models); decoupled models return ``None`` and answer through
  each ``request.responder`` (any number of responses, then a final one or ``send(None, final=True)``).
  It may be ``async def`` (it then runs to completion on its worker thread's event loop), and may call
  other loaded models with Triton's BLS names (:mod:`pagedserve_plugins.bls`, whose
  ``InferenceResponse`` it may also return);
* ``finalize(self) -> None`` (optional): called once when the model unloads.

A response's ``error`` (an :class:`~pagedserve.errors.InferenceError`) fails just that request; an
exception from ``execute`` fails every request of the batch that is still open. This module does not
know about batching or the wire.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import importlib.util
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import CoroutineType
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pagedserve.backend import LoadContext, Model, ModelBackend, ModelSpec, enum_name, instance_count
from pagedserve.errors import InferenceError
from pagedserve.hookspecs import hookimpl
from pagedserve.in_process import InProcessClient, ModelKey, chain_of
from pagedserve.inference import InferenceRequest, InferenceResponse
from pagedserve_plugins import bls

if TYPE_CHECKING:
    from pagedserve.protocol import model_config_pb2


@dataclass(frozen=True)
class PythonModelArgs:
    """What ``initialize`` receives (Triton passes the same facts as a dict of JSON strings)."""

    model_name: str
    model_version: int
    model_config: model_config_pb2.ModelConfig
    model_repository: Path
    """Folder of the model's YAML: relative paths in the config resolve against it."""
    instance_index: int = 0
    instance_kind: str = "KIND_CPU"

    def parameter(self, key: str, default: str | None = None) -> str | None:
        """A string from the config's ``parameters`` map."""
        if key in self.model_config.parameters:
            return self.model_config.parameters[key].string_value
        return default


def model_folder(spec: ModelSpec) -> Path:
    return spec.folder


def load_class(spec: ModelSpec) -> type:
    """Import the user class the config names; raise ``ValueError`` naming the bad parameter."""
    target = spec.parameter("python_class")
    if not target:
        raise ValueError(
            f"model '{spec.name}': the python backend needs parameters.python_class "
            "('package.module:ClassName', or 'ClassName' with parameters.python_file)"
        )
    file_name = spec.parameter("python_file")
    if file_name:
        module = _module_from_file(spec, spec.model_file(file_name, "parameters.python_file"))
        class_name = target.rpartition(":")[2]
    else:
        module_name, _, class_name = target.partition(":")
        if not class_name:
            raise ValueError(
                f"model '{spec.name}': parameters.python_class must be 'package.module:ClassName' "
                f"when no python_file is given, got '{target}'"
            )
        module = importlib.import_module(module_name)
    cls = getattr(module, class_name, None)
    if not isinstance(cls, type):
        raise ValueError(f"model '{spec.name}': '{module.__name__}' has no class '{class_name}'")
    if not callable(getattr(cls, "execute", None)):
        raise ValueError(f"model '{spec.name}': class '{class_name}' has no execute(requests) method")
    return cls


def _module_from_file(spec: ModelSpec, path: Path) -> Any:
    if not path.is_file():
        raise ValueError(f"model '{spec.name}': parameters.python_file '{path}' does not exist")
    # A name unique per file, so two models may each ship their own "model.py".
    digest = hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:12]
    name = f"pagedserve_user_models.{path.stem}_{digest}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ValueError(f"model '{spec.name}': cannot import '{path}'")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


class PythonModel(Model):
    """One loaded version: one user object per instance, each bound to the worker thread that first
    uses it (so per-instance state, such as a sequence's, stays with its instance)."""

    def __init__(self, spec: ModelSpec, instances: list[Any], client: InProcessClient | None = None) -> None:
        self.spec = spec
        self.instances = instances
        self.client = client
        self._decoupled = spec.decoupled  # read per batch; the config is complete by now
        self._bound = threading.local()
        self._lock = threading.Lock()
        self._next = 0
        self._loops: list[asyncio.AbstractEventLoop] = []
        self._callers: dict[tuple[ModelKey, ...], bls.BlsCaller] = {}

    def _instance(self) -> Any:
        instance = getattr(self._bound, "instance", None)
        if instance is None:
            with self._lock:
                instance = self.instances[self._next % len(self.instances)]
                self._next += 1
            self._bound.instance = instance
        return instance

    def execute(self, requests: list[InferenceRequest]) -> None:
        # The BLS caller is set by hand, not through ``bls.calling_as``: a generator context manager
        # per batch is a measurable share of a cheap model's request (docs/benchmarks.md).
        token = bls.current_caller.set(self._bls_caller(requests)) if self.client is not None else None
        try:
            responses = self._instance().execute(requests)
            if isinstance(responses, CoroutineType):
                responses = self._loop().run_until_complete(responses)
        finally:
            if token is not None:
                bls.current_caller.reset(token)
        if self._decoupled:
            if responses is not None:
                raise InferenceError.internal(
                    f"Python model '{self.spec.name}' is using the decoupled mode and the execute "
                    "function must return None"
                )
            return
        self._deliver(requests, responses)

    def _bls_caller(self, requests: list[InferenceRequest]) -> bls.BlsCaller:
        """BLS calls made by this batch extend the longest caller chain among its requests."""
        assert self.client is not None
        if len(requests) == 1:
            chain = chain_of(requests[0])
        else:
            chain = max(map(chain_of, requests), key=len, default=())
        caller = self._callers.get(chain)
        if caller is None:
            # Requests from the front-ends share one chain (this model): one caller serves them all.
            caller = bls.BlsCaller(self.client, chain)
            if len(chain) == 1 and len(self._callers) < 64:
                self._callers[chain] = caller
        return caller

    def _loop(self) -> asyncio.AbstractEventLoop:
        """This worker thread's event loop for ``async def execute``."""
        loop = getattr(self._bound, "loop", None)
        if loop is None:
            loop = self._bound.loop = asyncio.new_event_loop()
            with self._lock:
                self._loops.append(loop)
        return loop

    def _deliver(self, requests: list[InferenceRequest], responses: object) -> None:
        if not isinstance(responses, list | tuple) or len(responses) != len(requests):
            got = len(responses) if isinstance(responses, list | tuple) else type(responses).__name__
            raise InferenceError.internal(
                f"Python model '{self.spec.name}' returned {got} responses for {len(requests)} requests; "
                "execute must return one response per request"
            )
        for request, response in zip(requests, responses, strict=True):
            try:
                message = self._checked(request, response)
            except InferenceError as error:
                message = InferenceResponse(error=error)
            request.responder.send(message, final=True)

    def _checked(self, request: InferenceRequest, response: object) -> InferenceResponse:
        if isinstance(response, bls.InferenceResponse):
            response = response.to_served()
        if not isinstance(response, InferenceResponse):
            raise InferenceError.internal(
                f"Python model '{self.spec.name}' returned a {type(response).__name__} where an "
                "InferenceResponse was expected"
            )
        if response.error is not None:
            return response
        outputs = response.outputs
        if len(outputs) == len(request.requested_outputs):
            for name in request.requested_outputs:
                if type(outputs.get(name)) is not np.ndarray:
                    break
            else:
                return response  # exactly the requested outputs, as arrays already
        missing = [name for name in request.requested_outputs if name not in response.outputs]
        if missing:
            raise InferenceError.internal(
                f"Python model '{self.spec.name}' did not produce requested output(s) {missing}"
            )
        outputs = {name: np.asarray(response.outputs[name]) for name in request.requested_outputs}
        return InferenceResponse(outputs=outputs, parameters=response.parameters)

    def finalize(self) -> None:
        for instance in self.instances:
            finalize = getattr(instance, "finalize", None)
            if callable(finalize):
                finalize()
        for loop in self._loops:
            loop.close()


class PythonBackend(ModelBackend):
    """``backend: python``."""

    name: ClassVar[str] = "python"

    @classmethod
    def auto_complete(cls, config: model_config_pb2.ModelConfig) -> None:
        if "python_class" not in config.parameters:
            raise ValueError(
                "parameters.python_class is required by the python backend "
                "('package.module:ClassName', or 'ClassName' with parameters.python_file)"
            )

    def load(self, spec: ModelSpec, context: LoadContext) -> Model:
        cls = load_class(spec)
        if context.client is not None:
            bls.use_client(context.client)
        instances = []
        for index, kind in enumerate(_instance_kinds(spec)):
            instance = cls()
            initialize = getattr(instance, "initialize", None)
            if callable(initialize):
                initialize(
                    PythonModelArgs(
                        model_name=spec.name,
                        model_version=context.version,
                        model_config=spec.config,
                        model_repository=model_folder(spec),
                        instance_index=index,
                        instance_kind=kind,
                    )
                )
            instances.append(instance)
        return PythonModel(spec, instances, context.client)


def _instance_kinds(spec: ModelSpec) -> list[str]:
    """One entry per instance, in the order the batching policy numbers its workers."""
    kinds = [
        enum_name(group, "kind") for group in spec.config.instance_group for _ in range(max(group.count, 1))
    ]
    return kinds or ["KIND_CPU"] * instance_count(spec)


@hookimpl
def pagedserve_model_backends() -> list[type[ModelBackend]]:
    return [PythonBackend]
