"""Every hook a pagedserve plugin can implement, in one place.

A plugin is a module (or object) registered under the ``pagedserve.plugins`` entry-point group; the
built-ins in ``pagedserve_plugins`` register through that same group. Each hook returns the
*implementations* the plugin provides; nothing is instantiated or started at import time. The host
gathers them into name-keyed registries (:mod:`pagedserve.plugin_manager`) and the configuration picks
implementations by name (``kernel=triton``, ``scheduler=priority``, ``backend: python``...).

Implement a hook with the :data:`hookimpl` marker::

    from pagedserve.hookspecs import hookimpl

    @hookimpl
    def pagedserve_model_backends():
        return [MyBackend]

Every provided class carries a class attribute ``name: ClassVar[str]``; that is the name users select.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from hydra.core.config_store import ConfigStore
    from pagedserve.backend import ModelBackend
    from pagedserve.batching import BatchingPolicy
    from pagedserve.engine.attention import AttentionBackend
    from pagedserve.engine.policy import SchedulingPolicy
    from pagedserve.engine.routing import RoutingPolicy
    from pagedserve.frontends import Frontend
    from pagedserve.models.registry import ModelArchitecture

PROJECT = "pagedserve"
ENTRY_POINT_GROUP = "pagedserve.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def pagedserve_add_config(config_store: ConfigStore) -> None:
    """Contribute config schemas or group options before the configuration is composed.

    Store dataclass nodes in Hydra's ``ConfigStore``, e.g. a new scheduler option::

        config_store.store(group="scheduler", name="mine", node=SchedulerConfig(policy="mine"))
    """


@hookspec
def pagedserve_model_backends() -> list[type[ModelBackend]]:
    """Model backends (``backend:`` in a model's YAML), e.g. ``python``, ``torchscript``, ``llm``."""


@hookspec
def pagedserve_batching_policies() -> list[type[BatchingPolicy]]:
    """Request batching policies for tensor models (how queued requests become ``execute`` calls)."""


@hookspec
def pagedserve_attention_backends() -> list[type[AttentionBackend]]:
    """Paged-attention kernel backends (``kernel=torch|triton|auto``)."""


@hookspec
def pagedserve_scheduling_policies() -> list[type[SchedulingPolicy]]:
    """LLM engine scheduling policies (``scheduler.policy``: ``fcfs``, ``priority``, ...)."""


@hookspec
def pagedserve_routing_policies() -> list[type[RoutingPolicy]]:
    """Which replica of a data-parallel LLM model takes a request (``parameters.routing_policy``:
    ``least_outstanding``, ``prefix_affinity``, ...)."""


@hookspec
def pagedserve_model_architectures() -> list[type[ModelArchitecture]]:
    """LLM architectures, matched against ``architectures`` in a Hugging Face ``config.json``."""


@hookspec
def pagedserve_trace_exporters() -> list[type]:
    """Tracing exporters (``tracing=triton|opentelemetry``)."""


@hookspec
def pagedserve_frontends() -> list[type[Frontend]]:
    """Protocol front-ends (``frontends: [grpc, http, openai]``).

    Each is constructed as ``cls(config, core)`` over the one :class:`~pagedserve.core.ServerCore`
    every front-end shares, then started, told when the server is ready, drained and stopped by the
    server (see :class:`pagedserve.frontends.Frontend`)."""
