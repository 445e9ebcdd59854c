"""An ensemble's ``ensemble_scheduling`` as a checked data-flow graph (Triton's ensemble rules).

:func:`check_structure` needs only the ensemble's config: steps name a model and map tensors, every
ensemble input is consumed, every output produced, each tensor has one producer, and the steps form
no cycle. :func:`build_plan` then checks the steps against their models' configs (inputs and outputs
that exist, required inputs mapped, data types and shapes that agree along every edge) and returns
the :class:`EnsemblePlan` the runtime follows. Each problem is a ``ValueError`` that names the step.
This module loads nothing and runs nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pagedserve.backend import ModelSpec
from pagedserve.datatypes import of_tensor
from pagedserve.protocol import model_config_pb2 as mc

OUTPUT = -1
"""The consumer index of the ensemble's own outputs (steps are numbered from 0)."""


@dataclass(frozen=True)
class Step:
    index: int
    model_name: str
    model_version: int
    """-1 (or 0): the latest ready version."""
    input_map: dict[str, str]
    """Model input -> ensemble tensor."""
    output_map: dict[str, str]
    """Model output -> ensemble tensor."""
    decoupled: bool = False

    @property
    def label(self) -> str:
        return f"step {self.index} ('{self.model_name}')"


@dataclass(frozen=True)
class EnsemblePlan:
    name: str
    steps: tuple[Step, ...]
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    consumers: dict[str, tuple[tuple[int, str], ...]]
    """Ensemble tensor -> (step index or OUTPUT, the step's model input or the output's name)."""

    @property
    def decoupled(self) -> bool:
        """A step may answer any number of times, so the ensemble may too."""
        return any(step.decoupled for step in self.steps)


@dataclass(frozen=True)
class _TensorType:
    datatype: str
    shape: tuple[int, ...]
    """Full shape: a leading -1 for the batch dimension when the model batches."""
    owner: str

    def agrees_with(self, other: _TensorType) -> bool:
        if self.datatype != other.datatype or len(self.shape) != len(other.shape):
            return False
        return all(a == b or -1 in (a, b) for a, b in zip(self.shape, other.shape, strict=True))

    @property
    def described(self) -> str:
        return f"{self.datatype} [{','.join(str(d) for d in self.shape)}]"


def steps_of(config: mc.ModelConfig) -> list[Step]:
    return [
        Step(index, s.model_name, s.model_version, dict(s.input_map), dict(s.output_map))
        for index, s in enumerate(config.ensemble_scheduling.step)
    ]


def check_structure(config: mc.ModelConfig) -> None:
    """The rules that need no other model's config."""
    name = config.name
    steps = steps_of(config)
    if not steps:
        raise ValueError(f"ensemble '{name}': ensemble_scheduling.step must list at least one step")
    inputs = {tensor.name for tensor in config.input}
    for step in steps:
        _check_step_fields(name, step)
    producers = _producers(name, steps, inputs)
    for tensor in sorted(inputs - {t for s in steps for t in s.input_map.values()}):
        raise ValueError(
            f"ensemble '{name}': input '{tensor}' is not consumed by any step (no input_map value)"
        )
    for output in config.output:
        if output.name not in producers:
            raise ValueError(
                f"ensemble '{name}': output '{output.name}' is not produced by any step's output_map"
            )
    for step in steps:
        for model_input, tensor in step.input_map.items():
            if tensor not in inputs and tensor not in producers:
                raise ValueError(
                    f"ensemble '{name}' {step.label}: input '{model_input}' is mapped to '{tensor}', "
                    "which is neither an ensemble input nor an output of any step"
                )
    _check_acyclic(name, steps, producers)


def _check_step_fields(name: str, step: Step) -> None:
    where = f"ensemble '{name}' {step.label}"
    if not step.model_name:
        raise ValueError(f"ensemble '{name}' step {step.index}: model_name must be set")
    if step.model_name == name:
        raise ValueError(f"{where}: a step cannot run the ensemble itself")
    if step.model_version < -1:
        raise ValueError(
            f"{where}: model_version must be -1 (latest) or a version >= 1, got {step.model_version}"
        )
    if not step.input_map:
        raise ValueError(f"{where}: input_map must map at least one model input")
    if not step.output_map:
        raise ValueError(f"{where}: output_map must map at least one model output")


def _producers(name: str, steps: Sequence[Step], inputs: set[str]) -> dict[str, Step]:
    producers: dict[str, Step] = {}
    for step in steps:
        for tensor in step.output_map.values():
            if tensor in inputs:
                raise ValueError(
                    f"ensemble '{name}' {step.label}: output_map writes '{tensor}', "
                    "which is an ensemble input"
                )
            if tensor in producers:
                raise ValueError(
                    f"ensemble '{name}' {step.label}: tensor '{tensor}' is already produced by "
                    f"{producers[tensor].label}; each tensor has exactly one producer"
                )
            producers[tensor] = step
    return producers


def _check_acyclic(name: str, steps: Sequence[Step], producers: dict[str, Step]) -> None:
    """Depth-first search over "consumes an output of"; a step met again on the path is a cycle."""
    feeds = {
        s.index: sorted({producers[t].index for t in s.input_map.values() if t in producers}) for s in steps
    }
    state: dict[int, str] = {}
    for start in feeds:
        if state.get(start) == "done":
            continue
        path: list[int] = []
        stack: list[tuple[int, Iterable[int]]] = [(start, iter(feeds[start]))]
        state[start] = "open"
        path.append(start)
        while stack:
            node, children = stack[-1]
            child = next(iter(children), None)
            if child is None:
                state[node] = "done"
                stack.pop()
                path.pop()
            elif state.get(child) == "open":
                cycle = [*path[path.index(child) :], child]
                described = " -> ".join(steps[i].label for i in cycle)
                raise ValueError(
                    f"ensemble '{name}' {steps[child].label}: the steps form a cycle: {described}"
                )
            elif state.get(child) is None:
                state[child] = "open"
                path.append(child)
                stack.append((child, iter(feeds[child])))


def build_plan(config: mc.ModelConfig, specs: Sequence[ModelSpec]) -> EnsemblePlan:
    """The plan for ``config`` given the (loaded) spec of each step, in step order."""
    check_structure(config)
    name = config.name
    steps = [
        Step(s.index, s.model_name, s.model_version, s.input_map, s.output_map, spec.decoupled)
        for s, spec in zip(steps_of(config), specs, strict=True)
    ]
    types = {t.name: _tensor_type(t, config, "ensemble input") for t in config.input}
    for step, spec in zip(steps, specs, strict=True):
        _check_mapped_names(name, step, spec)
        if config.max_batch_size > spec.config.max_batch_size:
            raise ValueError(
                f"ensemble '{name}' {step.label}: the ensemble's max_batch_size {config.max_batch_size} "
                f"exceeds the model's {spec.config.max_batch_size}"
            )
        outputs = {o.name: o for o in spec.config.output}
        for model_output, tensor in step.output_map.items():
            types[tensor] = _tensor_type(
                outputs[model_output], spec.config, f"output '{model_output}' of {step.label}"
            )
    for step, spec in zip(steps, specs, strict=True):
        inputs = {i.name: i for i in spec.config.input}
        for model_input, tensor in step.input_map.items():
            wanted = _tensor_type(inputs[model_input], spec.config, f"input '{model_input}' of {step.label}")
            _check_edge(f"ensemble '{name}' {step.label}", tensor, types[tensor], wanted)
    for output in config.output:
        wanted = _tensor_type(output, config, "ensemble output")
        _check_edge(f"ensemble '{name}'", output.name, types[output.name], wanted)
    return EnsemblePlan(
        name=name,
        steps=tuple(steps),
        inputs=tuple(t.name for t in config.input),
        outputs=tuple(t.name for t in config.output),
        consumers=_consumers(steps, [o.name for o in config.output]),
    )


def _check_mapped_names(name: str, step: Step, spec: ModelSpec) -> None:
    where = f"ensemble '{name}' {step.label}"
    inputs = {i.name: i for i in spec.config.input}
    outputs = {o.name for o in spec.config.output}
    for model_input in step.input_map:
        if model_input not in inputs:
            raise ValueError(f"{where}: input_map names '{model_input}', which is not an input of the model")
    for model_output in step.output_map:
        if model_output not in outputs:
            raise ValueError(
                f"{where}: output_map names '{model_output}', which is not an output of the model"
            )
    missing = [i for i, tensor in inputs.items() if not tensor.optional and i not in step.input_map]
    if missing:
        raise ValueError(f"{where}: required model input(s) {missing} are not in input_map")


def _tensor_type(tensor: Any, config: mc.ModelConfig, owner: str) -> _TensorType:
    batch = (-1,) if config.max_batch_size > 0 else ()
    return _TensorType(of_tensor(tensor), (*batch, *tensor.dims), owner)


def _check_edge(where: str, tensor: str, source: _TensorType, target: _TensorType) -> None:
    if not source.agrees_with(target):
        raise ValueError(
            f"{where}: tensor '{tensor}' is {source.described} as {source.owner}, but {target.owner} expects "
            f"{target.described}"
        )


def _consumers(steps: Sequence[Step], outputs: Sequence[str]) -> dict[str, tuple[tuple[int, str], ...]]:
    consumers: dict[str, list[tuple[int, str]]] = {}
    for step in steps:
        for model_input, tensor in step.input_map.items():
            consumers.setdefault(tensor, []).append((step.index, model_input))
    for output in outputs:
        consumers.setdefault(output, []).append((OUTPUT, output))
    return {tensor: tuple(entries) for tensor, entries in consumers.items()}
