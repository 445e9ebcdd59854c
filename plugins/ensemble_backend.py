"""``platform: ensemble``: a pipeline of loaded models wired by ``ensemble_scheduling`` (Triton's ensembles).

An ensemble is a model YAML without code: inputs, outputs and steps, each step naming a model (and
version, -1 = latest) and mapping that model's inputs and outputs onto the ensemble's tensors::

    platform: ensemble
    input: [{name: PROMPT, data_type: TYPE_STRING, dims: [1]}]
    output: [{name: TEXT, data_type: TYPE_STRING, dims: [-1]}]
    ensemble_scheduling:
      step:
        - {model_name: pre, model_version: -1, input_map: {IN: PROMPT}, output_map: {OUT: ids}}
        - {model_name: post, model_version: -1, input_map: {IN: ids}, output_map: {OUT: TEXT}}

Loading an ensemble loads its composing models first, as Triton does, unless they are loaded
already; one that cannot load fails the ensemble's load with its reason. The graph is checked then
(:mod:`pagedserve_plugins.ensemble_plan`); a request runs as :mod:`pagedserve_plugins.ensemble_run`
describes, each step through the in-process client, so steps count in their models' statistics.

An ensemble is served as a decoupled model that answers a unary call when it sends one response (our
``unary_decoupled`` extension, as the LLM backend): a step may stream, and then so does the ensemble
(ModelStreamInfer); a pipeline of non-decoupled models sends exactly one response either way.
Unloading a composing model leaves the ensemble loaded; its requests then fail with that model's
"unknown model" error until it is back.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

from pagedserve.backend import LoadContext, Model, ModelBackend, ModelSpec
from pagedserve.errors import InferenceError
from pagedserve.hookspecs import hookimpl
from pagedserve.in_process import InProcessClient
from pagedserve.inference import InferenceRequest
from pagedserve_plugins.ensemble_plan import EnsemblePlan, Step, build_plan, check_structure, steps_of
from pagedserve_plugins.ensemble_run import EnsembleRun

if TYPE_CHECKING:
    from pagedserve.model_manager import ModelManager
    from pagedserve.protocol import model_config_pb2

PLATFORM = "ensemble"
# Batching happens in the composing models; an ensemble only routes tensors.
_REFUSED_FIELDS = ("dynamic_batching", "sequence_batching")


class EnsembleModel(Model):
    def __init__(self, plan: EnsemblePlan, client: InProcessClient) -> None:
        self.plan = plan
        self.client = client

    def execute(self, requests: list[InferenceRequest]) -> None:
        for request in requests:
            EnsembleRun(self.plan, request, self.client).start()  # returns once its first steps are queued


class EnsembleBackend(ModelBackend):
    """``platform: ensemble`` (the model manager maps the platform to this backend's name)."""

    name: ClassVar[str] = PLATFORM

    @classmethod
    def auto_complete(cls, config: model_config_pb2.ModelConfig) -> None:
        for field in _REFUSED_FIELDS:
            if config.HasField(field):
                raise ValueError(
                    f"ensemble '{config.name}': {field} is not supported on an ensemble; set it on the "
                    "composing models"
                )
        check_structure(config)
        config.model_transaction_policy.decoupled = True
        config.parameters["unary_decoupled"].string_value = "true"

    def load(self, spec: ModelSpec, context: LoadContext) -> Model:
        if context.client is None:
            raise ValueError(f"ensemble '{spec.name}' needs the model manager to reach its composing models")
        manager = context.client.manager
        steps = steps_of(spec.config)
        _check_no_nested_cycle(manager, steps, [spec.name])
        _load_composing(manager, spec.name, steps)
        specs = [_composing_spec(manager, spec.name, step) for step in steps]
        return EnsembleModel(build_plan(spec.config, specs), context.client)


def _check_no_nested_cycle(manager: ModelManager, steps: list[Step], path: list[str]) -> None:
    """Ensembles whose steps lead back to one on ``path`` would load (and run) each other forever;
    checked on the configs before anything loads, so no load waits for its own."""
    for step in steps:
        if step.model_name in path:
            cycle = " -> ".join([*path, step.model_name])
            raise ValueError(f"ensemble '{path[0]}' {step.label}: ensembles form a cycle: {cycle}")
        nested = _steps_from_repository(manager, step.model_name)
        _check_no_nested_cycle(manager, nested, [*path, step.model_name])


def _steps_from_repository(manager: ModelManager, name: str) -> list[Step]:
    spec = manager.spec(name)
    if spec is None:
        try:
            spec = manager.repository.read(name)
        except (ValueError, OSError, InferenceError):
            return []  # loading it will say what is wrong
    if (spec.config.platform or spec.config.backend) != PLATFORM:
        return []
    return steps_of(spec.config)


def _load_composing(manager: ModelManager, name: str, steps: list[Step]) -> None:
    for step in steps:
        if manager.is_ready(step.model_name):
            continue
        if step.model_name not in manager.repository.names():
            raise ValueError(
                f"ensemble '{name}' {step.label}: model '{step.model_name}' is not in the model repository"
            )
        try:
            manager.load(step.model_name)
        except InferenceError as error:
            raise ValueError(
                f"ensemble '{name}' {step.label}: composing model failed to load: {error.message.strip()}"
            ) from None


def _composing_spec(manager: ModelManager, name: str, step: Step) -> ModelSpec:
    version = "" if step.model_version in (-1, 0) else str(step.model_version)
    try:
        return manager.resolve(step.model_name, version).spec
    except InferenceError as error:
        raise ValueError(f"ensemble '{name}' {step.label}: {error.message}") from None


@hookimpl
def pagedserve_model_backends() -> list[type[ModelBackend]]:
    return [EnsembleBackend]
