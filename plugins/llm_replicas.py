"""Data-parallel replicas of an LLM model: its ``instance_group`` as one engine configuration per
replica, and the engines (one :class:`EngineProcess`, or a :class:`ReplicaSet` of several) started.

Each group's ``count`` is how many replicas it starts, each an engine process of its own:

* ``KIND_GPU``: one GPU per replica, those ``gpus`` lists (as many as ``count``) or else the lowest
  visible GPUs no other group lists.
* ``KIND_CPU``: on the CPU. The CPU replicas share ``engine.cpu_threads`` (and
  ``cache.memory_fraction`` of free RAM): they start together and would each take it all.
* ``KIND_MODEL`` / ``KIND_AUTO`` (the vLLM backend's default): on ``engine.device``; several on CUDA
  take GPUs as a ``KIND_GPU`` group without ``gpus`` does.

Triton counts a ``KIND_GPU`` group's instances per listed GPU. An engine sizes its KV cache for its
whole GPU (``cache.memory_fraction``), so two on one GPU cannot both fit; here ``count`` is the
group's replicas, each on a GPU of its own, and a configuration that would put two on one GPU, or one
on a GPU that is not visible, fails at load naming the key. Where both readings agree (``count: 1``
per listed GPU) a Triton configuration means the same here.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from pagedserve.backend import ModelSpec, enum_name

if TYPE_CHECKING:
    from pagedserve.config import BackendSettings, EngineSettings
    from pagedserve.engine.config import EngineConfig
    from pagedserve.engine.engine_process import EngineProcess
    from pagedserve.engine.registries import EngineRegistries
    from pagedserve.engine.replicas import ReplicaSet
    from pagedserve.engine.routing import RoutingPolicy

DEFAULT_ROUTING_POLICY = "least_outstanding"


def start_engines(
    spec: ModelSpec, configs: list[EngineConfig], settings: BackendSettings, registries: EngineRegistries
) -> EngineProcess | ReplicaSet:
    """One engine process per configuration; several behind a router."""
    from pagedserve.engine.engine_process import EngineProcess
    from pagedserve.engine.replicas import ReplicaSet

    policy = routing_policy(spec, settings)
    if len(configs) == 1:
        return EngineProcess(configs[0], registries)
    return ReplicaSet.spawn(configs, registries, policy)


def routing_policy(spec: ModelSpec, settings: BackendSettings) -> RoutingPolicy:
    """The policy ``parameters.routing_policy`` names (checked for one replica too, so a typo fails
    before a second replica is added)."""
    name = spec.parameter("routing_policy") or DEFAULT_ROUTING_POLICY
    policies = _routing_policies(settings)
    if name not in policies:
        raise ValueError(
            f"parameters.routing_policy: unknown routing policy {name[:64]!r}; available: "
            f"{', '.join(sorted(policies))}"
        )
    parameters = {key: value.string_value for key, value in spec.config.parameters.items()}
    return policies[name](settings.cache.block_size, parameters)


def _routing_policies(settings: BackendSettings) -> dict[str, type[RoutingPolicy]]:
    registries = settings.registries
    if registries is None:  # settings built in code (tests, the offline API): the built-ins
        from pagedserve_plugins.routing_policies import ROUTING_POLICIES

        return {policy.name: policy for policy in ROUTING_POLICIES}
    return registries.routing_policies.items()


def replica_configs(
    spec: ModelSpec, config: EngineConfig, engine: EngineSettings, num_gpus: int | None = None
) -> list[EngineConfig]:
    """One configuration per replica, in group order; ``num_gpus``: the visible GPUs (asked of torch
    when None). A single replica of ``KIND_MODEL``/``KIND_AUTO`` keeps ``config`` as it is."""
    groups = list(spec.config.instance_group)
    kinds = [enum_name(group, "kind") for group in groups]
    if sum(max(group.count, 1) for group in groups) <= 1 and set(kinds) <= {"KIND_MODEL", "KIND_AUTO"}:
        return [config]
    num_gpus = _visible_gpus() if num_gpus is None else num_gpus
    devices = _devices(groups, kinds, config.device, num_gpus)
    if len(devices) > 1 and config.tensor_parallel_size > 1 and any(d.startswith("cuda") for d in devices):
        # Each replica here takes one GPU; a tensor-parallel engine takes several, from device 0 on.
        raise ValueError(
            f"instance_group: {len(devices)} GPU replicas with engine.tensor_parallel_size="
            f"{config.tensor_parallel_size} would share GPUs; run one replica per server for now"
        )
    if len(devices) > 1 and not engine.separate_process:
        raise ValueError(
            f"instance_group: {len(devices)} replicas need engine.separate_process=true (each replica is "
            "an engine process of its own)"
        )
    return _share_cpu(config, devices, engine.cpu_threads)


def _devices(groups: list, kinds: list[str], engine_device: str, num_gpus: int) -> list[str]:
    """Each replica's device, in group order."""
    on_gpu = [
        kind == "KIND_GPU" or (kind != "KIND_CPU" and _is_cuda(engine_device, num_gpus)) for kind in kinds
    ]
    taken: dict[int, str] = {}
    for index, group in enumerate(groups):
        where = f"instance_group[{index}]"
        if group.gpus and not on_gpu[index]:
            raise ValueError(
                f"{where}.gpus: replicas of kind {kinds[index]} on engine.device={engine_device} use no GPU"
            )
        if group.gpus and len(group.gpus) != max(group.count, 1):
            raise ValueError(
                f"{where}: count is {max(group.count, 1)} but gpus lists {len(group.gpus)}; each replica "
                "runs on one GPU of the list"
            )
        for gpu in group.gpus:
            _take(taken, gpu, f"{where}.gpus", num_gpus)
    devices = []
    for index, group in enumerate(groups):
        where = f"instance_group[{index}]"
        count = max(group.count, 1)
        if not on_gpu[index]:
            devices += ["cpu"] * count
        elif group.gpus:
            devices += [f"cuda:{gpu}" for gpu in group.gpus]
        elif count == 1 and len(groups) == 1 and kinds[index] != "KIND_GPU":
            devices.append(engine_device)  # one replica where the engine would have run anyway
        else:
            if engine_device.startswith("cuda:") and kinds[index] != "KIND_GPU":
                raise ValueError(
                    f"{where}.count: engine.device={engine_device} names one GPU for {count} replicas; "
                    "list their GPUs in instance_group[].gpus with kind KIND_GPU"
                )
            devices += [f"cuda:{_take_free(taken, where, count, num_gpus)}" for _ in range(count)]
    return devices


def _is_cuda(engine_device: str, num_gpus: int) -> bool:
    return engine_device.startswith("cuda") or (engine_device == "auto" and num_gpus > 0)


def _take(taken: dict[int, str], gpu: int, where: str, num_gpus: int) -> None:
    if gpu >= num_gpus:
        visible = f"GPUs 0-{num_gpus - 1}" if num_gpus else "no GPU"
        raise ValueError(f"{where}: GPU {gpu} is not visible (this process sees {visible})")
    if gpu in taken:
        raise ValueError(
            f"{where}: GPU {gpu} already runs a replica ({taken[gpu]}); an engine sizes its KV cache for "
            "its whole GPU, so each GPU takes one replica"
        )
    taken[gpu] = where


def _take_free(taken: dict[int, str], where: str, count: int, num_gpus: int) -> int:
    free = next((gpu for gpu in range(num_gpus) if gpu not in taken), None)
    if free is None:
        raise ValueError(
            f"{where}.count: {count} GPU replicas, but only {num_gpus} GPU(s) are visible and each "
            "takes one (the others already run replicas)"
            if num_gpus
            else f"{where}.kind: GPU replicas, but no CUDA GPU is visible"
        )
    taken[free] = where
    return free


def _share_cpu(config: EngineConfig, devices: list[str], cpu_threads: int | None) -> list[EngineConfig]:
    """CPU replicas split the CPU threads and the RAM fraction; GPU replicas keep the engine's."""
    from pagedserve.engine.process_setup import resolve_cpu_threads, usable_cores

    num_cpu = devices.count("cpu")
    threads, cache = config.cpu_threads, config.cache
    if num_cpu > 1:
        if cpu_threads is not None and cpu_threads < num_cpu:
            raise ValueError(
                f"instance_group: {num_cpu} CPU replicas, but engine.cpu_threads={cpu_threads}; each "
                "replica needs a thread of its own"
            )
        if cpu_threads is None and num_cpu > usable_cores():
            raise ValueError(
                f"instance_group: {num_cpu} CPU replicas, but this process may run on {usable_cores()} "
                "core(s); each replica needs one"
            )
        threads = max(1, resolve_cpu_threads(cpu_threads) // num_cpu)
        cache = dataclasses.replace(cache, memory_fraction=cache.memory_fraction / num_cpu)
    return [
        dataclasses.replace(config, device=device, cpu_threads=threads, cache=cache)
        if device == "cpu"
        else dataclasses.replace(config, device=device)
        for device in devices
    ]


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
