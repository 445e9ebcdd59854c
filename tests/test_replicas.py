"""Data-parallel replicas of an LLM model, without processes: where ``instance_group`` puts each
replica (and the configurations refused at load, naming the key), the routing policies, and the
router's bookkeeping over fake engines. ``test_replicas_server.py`` runs two real replicas."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

import pytest
from pagedserve.backend import ModelSpec
from pagedserve.config import BackendSettings, EngineSettings
from pagedserve.engine.block_manager import BlockUsage
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.engine_core import EngineStats
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.replicas import ReplicaSet
from pagedserve.engine.request import EngineRequest
from pagedserve.engine.routing import ReplicaLoad
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.protocol import model_config_pb2 as mc
from pagedserve_plugins import llm_replicas
from pagedserve_plugins.llm_backend import LLMBackend
from pagedserve_plugins.llm_replicas import replica_configs, routing_policy
from pagedserve_plugins.routing_policies import LeastOutstanding, PrefixAffinity

KIND = mc.ModelInstanceGroup.Kind
BASE = EngineConfig(model="tiny-llama", cpu_threads=None)


def spec(*groups: dict, **parameters: str) -> ModelSpec:
    config = mc.ModelConfig(name="m", backend="llm")
    for group in groups:
        config.instance_group.add(
            kind=KIND.Value(group.get("kind", "KIND_MODEL")),
            count=group.get("count", 1),
            gpus=group.get("gpus", []),
        )
    for key, value in parameters.items():
        config.parameters[key].string_value = value
    return ModelSpec("m", config)


def configs(
    *groups: dict, num_gpus: int = 0, base: EngineConfig = BASE, **engine: object
) -> list[EngineConfig]:
    return replica_configs(spec(*groups), base, EngineSettings(**engine), num_gpus=num_gpus)


# ---- placement -------------------------------------------------------------------------------------


def test_one_model_replica_keeps_the_engine_configuration() -> None:
    assert configs({"kind": "KIND_MODEL", "count": 1}) == [BASE]
    assert configs() == [BASE]  # no instance_group at all


def test_cpu_replicas_share_threads_and_memory() -> None:
    replicas = configs({"kind": "KIND_CPU", "count": 2}, cpu_threads=4)
    assert [c.device for c in replicas] == ["cpu", "cpu"]
    assert [c.cpu_threads for c in replicas] == [2, 2]
    assert [c.cache.memory_fraction for c in replicas] == [BASE.cache.memory_fraction / 2] * 2


def test_automatic_threads_are_shared_too(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("pagedserve.engine.process_setup.usable_cores", lambda: 8)
    assert [c.cpu_threads for c in configs({"kind": "KIND_CPU", "count": 2})] == [3, 3]  # (8 - 1) // 2


def test_model_kind_replicas_follow_engine_device() -> None:
    assert [c.device for c in configs({"kind": "KIND_MODEL", "count": 2}, cpu_threads=2)] == ["cpu", "cpu"]
    assert [c.device for c in configs({"kind": "KIND_AUTO", "count": 2}, num_gpus=2)] == ["cuda:0", "cuda:1"]


def test_gpu_replicas_each_get_a_gpu() -> None:
    listed = configs({"kind": "KIND_GPU", "count": 2, "gpus": [3, 1]}, num_gpus=4)
    assert [c.device for c in listed] == ["cuda:3", "cuda:1"]
    assert all(c.cpu_threads == BASE.cpu_threads for c in listed)
    # A group without gpus takes the lowest GPUs that no other group lists.
    mixed = configs({"kind": "KIND_GPU", "count": 2}, {"kind": "KIND_GPU", "gpus": [0]}, num_gpus=3)
    assert [c.device for c in mixed] == ["cuda:1", "cuda:2", "cuda:0"]


def test_gpu_replicas_of_a_tensor_parallel_engine_are_refused() -> None:
    import dataclasses

    tp2 = dataclasses.replace(BASE, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="instance_group: 2 GPU replicas with engine.tensor_parallel_size=2"):
        configs({"kind": "KIND_GPU", "count": 2}, num_gpus=4, base=tp2)
    assert len(configs({"kind": "KIND_CPU", "count": 2}, base=tp2)) == 2  # CPU replicas share no device


@pytest.mark.parametrize(
    ("groups", "num_gpus", "engine", "message"),
    [
        (
            [{"kind": "KIND_GPU", "count": 2}],
            0,
            {},
            r"instance_group\[0\]\.kind: GPU replicas, but no CUDA GPU",
        ),
        (
            [{"kind": "KIND_GPU", "count": 3}],
            2,
            {},
            r"instance_group\[0\]\.count: 3 GPU replicas, but only 2",
        ),
        ([{"kind": "KIND_GPU", "gpus": [2]}], 2, {}, r"instance_group\[0\]\.gpus: GPU 2 is not visible"),
        ([{"kind": "KIND_GPU", "gpus": [7]}], 0, {}, r"GPU 7 is not visible \(this process sees no GPU\)"),
        (
            [{"kind": "KIND_GPU", "gpus": [0]}, {"kind": "KIND_GPU", "gpus": [0]}],
            2,
            {},
            r"instance_group\[1\]\.gpus: GPU 0 already runs a replica \(instance_group\[0\]\.gpus\)",
        ),
        (
            [{"kind": "KIND_GPU", "count": 2, "gpus": [0]}],
            2,
            {},
            r"instance_group\[0\]: count is 2 but gpus lists 1",
        ),
        ([{"kind": "KIND_GPU", "count": 1, "gpus": [0, 1]}], 2, {}, r"count is 1 but gpus lists 2"),
        (
            [{"kind": "KIND_CPU", "count": 3}],
            0,
            {"cpu_threads": 2},
            r"3 CPU replicas, but engine\.cpu_threads=2",
        ),
        ([{"kind": "KIND_CPU", "count": 64}], 0, {}, r"64 CPU replicas, but this process may run on"),
        (
            [{"kind": "KIND_CPU", "count": 2}],
            0,
            {"separate_process": False, "cpu_threads": 2},
            r"2 replicas need engine\.separate_process=true",
        ),
        (
            [{"kind": "KIND_AUTO", "count": 2, "gpus": [0, 1]}],
            0,
            {},
            r"instance_group\[0\]\.gpus: replicas of kind",
        ),
    ],
)
def test_bad_placements_fail_naming_the_key(
    groups: list[dict], num_gpus: int, engine: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        configs(*groups, num_gpus=num_gpus, **engine)


def test_one_named_gpu_cannot_hold_several_replicas() -> None:
    base = dataclasses.replace(BASE, device="cuda:1")
    with pytest.raises(ValueError, match=r"instance_group\[0\]\.count: engine\.device=cuda:1 names one GPU"):
        configs({"kind": "KIND_MODEL", "count": 2}, num_gpus=2, base=base)


# ---- routing policies ------------------------------------------------------------------------------


def loads(*outstanding: int) -> list[ReplicaLoad]:
    return [ReplicaLoad(index, n) for index, n in enumerate(outstanding)]


def test_least_outstanding_takes_turns_among_ties() -> None:
    policy = LeastOutstanding(16, {})
    assert policy.choose([], loads(3, 1, 2)) == 1
    assert [policy.choose([], loads(0, 0, 0)) for _ in range(4)] == [2, 0, 1, 2]
    assert policy.choose([], [ReplicaLoad(2, 5), ReplicaLoad(4, 5)]) == 4


def prompt(seed: int, length: int = 64) -> list[int]:
    return random.Random(seed).choices(range(512), k=length)


def test_prefix_affinity_keeps_a_prefix_on_one_replica_and_spreads_prefixes() -> None:
    policy = PrefixAffinity(16, {"routing_prefix_blocks": "2"})
    base = prompt(1)
    chosen = {policy.choose(base[:32] + prompt(seed, 40), loads(0, 0, 0, 0)) for seed in range(20)}
    assert len(chosen) == 1  # the same first two blocks, whatever follows
    spread = {policy.choose(prompt(seed), loads(0, 0, 0, 0)) for seed in range(40)}
    assert spread == {0, 1, 2, 3}


def test_prefix_affinity_moves_only_the_keys_of_a_missing_replica() -> None:
    policy = PrefixAffinity(16, {})
    everyone = {seed: policy.choose(prompt(seed), loads(0, 0, 0)) for seed in range(60)}
    without_1 = {
        seed: policy.choose(prompt(seed), [ReplicaLoad(0, 0), ReplicaLoad(2, 0)]) for seed in range(60)
    }
    assert all(without_1[seed] == replica for seed, replica in everyone.items() if replica != 1)


def test_prefix_affinity_yields_to_balance() -> None:
    policy = PrefixAffinity(16, {"routing_max_imbalance": "4"})
    tokens = prompt(7)
    preferred = policy.choose(tokens, loads(0, 0))
    other = 1 - preferred
    busy = [ReplicaLoad(preferred, 4), ReplicaLoad(other, 0)]
    assert policy.choose(tokens, busy) == preferred  # 4 beyond the least loaded: still within bounds
    busy = [ReplicaLoad(preferred, 5), ReplicaLoad(other, 0)]
    assert policy.choose(tokens, busy) == other
    assert policy.choose(tokens[:15], [ReplicaLoad(0, 3), ReplicaLoad(1, 2)]) == 1  # no full block


@pytest.mark.parametrize(
    ("parameters", "message"),
    [
        (
            {"routing_policy": "fastest"},
            r"parameters\.routing_policy: unknown routing policy 'fastest'; "
            "available: least_outstanding, prefix_affinity",
        ),
        ({"routing_policy": "x" * 100_000}, r"unknown routing policy 'x{64}'; available"),
        (
            {"routing_policy": "prefix_affinity", "routing_prefix_blocks": "0"},
            r"routing_prefix_blocks must be in \[1, 1024\]",
        ),
        (
            {"routing_policy": "prefix_affinity", "routing_prefix_blocks": "1e9"},
            r"routing_prefix_blocks must be an integer",
        ),
        (
            {"routing_policy": "prefix_affinity", "routing_prefix_blocks": str(2**70)},
            r"must be in \[1, 1024\]",
        ),
        (
            {"routing_policy": "prefix_affinity", "routing_max_imbalance": "-1"},
            r"routing_max_imbalance must be in",
        ),
    ],
)
def test_bad_routing_parameters_fail_naming_the_key(parameters: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        routing_policy(spec(**parameters), BackendSettings())


def test_routing_parameters_are_known_to_the_backend() -> None:
    config = spec(
        routing_policy="prefix_affinity", routing_prefix_blocks="2", routing_max_imbalance="3"
    ).config
    LLMBackend.auto_complete(config)  # accepted
    config.parameters["routing_polcy"].string_value = "prefix_affinity"
    with pytest.raises(ValueError, match="did you mean 'routing_policy'"):
        LLMBackend.auto_complete(config)


def test_routing_policies_come_through_the_plugin_hook() -> None:
    from pagedserve.plugin_manager import PluginHost

    registries = PluginHost().registries()
    assert {"least_outstanding", "prefix_affinity"} <= set(registries.routing_policies.names())
    assert registries.routing_policies.provider("prefix_affinity") == "llm_backend"
    settings = BackendSettings(registries=registries)
    assert isinstance(routing_policy(spec(routing_policy="prefix_affinity"), settings), PrefixAffinity)
    assert isinstance(routing_policy(spec(), settings), LeastOutstanding)  # the default


# ---- the router over fake engines ------------------------------------------------------------------


class FakeEngine:
    """EngineProcess's interface; keeps submitted callbacks so a test can finish requests."""

    def __init__(self, running: int = 0) -> None:
        self.callbacks: dict[str, Callable[[RequestOutput], None]] = {}
        self.aborted: list[str] = []
        self.restarts = 0
        self.restarting = False
        self.reason: str | None = None
        self.tokenizer = None
        self.running = running

    def failure(self) -> str | None:
        return self.reason

    def make_request(
        self, request_id: str, prompt: list[int], params: SamplingParams | None = None, priority: int = 0
    ) -> EngineRequest:
        return EngineRequest(request_id, prompt, params or SamplingParams())

    def submit(self, request: EngineRequest, callback: Callable[[RequestOutput], None]) -> None:
        self.callbacks[request.request_id] = callback

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def finish(self, request_id: str) -> None:
        self.callbacks.pop(request_id)(RequestOutput(request_id, [], [], True))

    def stats(self) -> EngineStats:
        return EngineStats(self.running, 1, BlockUsage(10, 4, 6, 0, 8, 2), 1)

    def start(self) -> None: ...

    def stop(self, timeout: float | None = None) -> None: ...


def router(num: int = 2) -> tuple[ReplicaSet, list[FakeEngine]]:
    engines = [FakeEngine(running=i) for i in range(num)]
    return ReplicaSet(engines, LeastOutstanding(16, {})), engines  # type: ignore[arg-type]


def submit(replicas: ReplicaSet, request_id: str, n: int = 1) -> list[RequestOutput]:
    outputs: list[RequestOutput] = []
    replicas.submit(replicas.make_request(request_id, [1, 2, 3], SamplingParams(n=n)), outputs.append)
    return outputs


def test_router_balances_and_sends_aborts_to_the_owner() -> None:
    replicas, (a, b) = router()
    submit(replicas, "r0", n=3)
    submit(replicas, "r1")
    submit(replicas, "r2")
    assert set(a.callbacks) == {"r0"} and set(b.callbacks) == {"r1", "r2"}
    replicas.abort("r2")
    assert b.aborted == ["r2"] and a.aborted == []
    b.finish("r1")
    b.finish("r2")
    submit(replicas, "r3")  # b has nothing outstanding now
    assert "r3" in b.callbacks
    assert [(s.routed, s.outstanding) for s in replicas.replica_states()] == [(1, 3), (3, 1)]
    replicas.abort("r1")  # finished: nobody to tell
    assert b.aborted == ["r2"]


def test_router_skips_restarting_and_failed_replicas() -> None:
    replicas, (a, b) = router()
    a.restarting = True
    for i in range(3):
        submit(replicas, f"r{i}")
    assert set(b.callbacks) == {"r0", "r1", "r2"}
    assert [s.up for s in replicas.replica_states()] == [False, True]
    b.reason = "died too often"
    submit(replicas, "r3")  # none serving: the restarting one queues it for its new process
    assert "r3" in a.callbacks
    assert replicas.failure() is None
    a.reason = "could not restart"
    assert replicas.failure() == (
        "every replica is down: replica 0: could not restart; replica 1: died too often"
    )


def test_router_refuses_a_duplicate_request_id() -> None:
    replicas, (a, b) = router()
    submit(replicas, "same")
    outputs = submit(replicas, "same")
    assert outputs[0].finished and outputs[0].error_code == "INVALID_ARGUMENT"
    assert "already in use" in (outputs[0].error or "")
    assert list(a.callbacks) == ["same"] and not b.callbacks


def test_router_sums_statistics() -> None:
    replicas, engines = router(3)
    engines[1].restarts = 2
    stats = replicas.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_preemptions) == (3, 3, 3)
    assert stats.usage == BlockUsage(30, 12, 18, 0, 24, 6)
    assert stats.usage.usage == pytest.approx(0.4)
    assert replicas.restarts == 2
    assert [s.num_running for s in replicas.replica_states()] == [0, 1, 2]


def test_start_engines_stops_the_started_when_one_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[FakeEngine] = []

    class Engine(FakeEngine):
        def __init__(self, config: EngineConfig, registries: object) -> None:
            super().__init__()
            if config.seed == 1:
                raise RuntimeError("out of memory")
            started.append(self)

        def stop(self, timeout: float | None = None) -> None:
            self.reason = "stopped"

    monkeypatch.setattr("pagedserve.engine.replicas.EngineProcess", Engine)
    two = configs({"kind": "KIND_CPU", "count": 2}, cpu_threads=2)
    two[1] = dataclasses.replace(two[1], seed=1)
    with pytest.raises(RuntimeError, match=r"replica 1 \(cpu\): out of memory"):
        llm_replicas.start_engines(spec({"kind": "KIND_CPU", "count": 2}), two, BackendSettings(), None)  # type: ignore[arg-type]
    assert [engine.reason for engine in started] == ["stopped"]
