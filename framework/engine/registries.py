"""Name-keyed registries of the engine's plugin kinds, filled from pluggy hooks.

The host normally passes its own plugin manager; :meth:`EngineRegistries.builtin` registers only
the built-in plugin modules, for tests and the offline API.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pluggy
from pagedserve import hookspecs


@dataclass
class EngineRegistries:
    attention_backends: dict[str, type]
    scheduling_policies: dict[str, type]
    architectures: dict[str, type]

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> EngineRegistries:
        return cls(
            attention_backends=_by_name("attention backend", pm.hook.pagedserve_attention_backends()),
            scheduling_policies=_by_name("scheduling policy", pm.hook.pagedserve_scheduling_policies()),
            architectures=_by_name("model architecture", pm.hook.pagedserve_model_architectures()),
        )

    @classmethod
    def builtin(cls) -> EngineRegistries:
        from pagedserve_plugins import architectures, scheduling_policies, torch_attention, triton_attention

        pm = pluggy.PluginManager(hookspecs.PROJECT)
        pm.add_hookspecs(hookspecs)
        for module in (torch_attention, triton_attention, scheduling_policies, architectures):
            pm.register(module)
        return cls.from_plugin_manager(pm)


def _by_name(kind: str, results: list[list[Any]]) -> dict[str, type]:
    # pluggy calls the most recently registered plugin first; reverse so registration order wins.
    registry: dict[str, type] = {}
    for provided in reversed(results):
        for cls in provided or []:
            if cls.name in registry and registry[cls.name] is not cls:
                raise ValueError(
                    f"two plugins register a {kind} named {cls.name!r}: "
                    f"{registry[cls.name].__module__} and {cls.__module__}"
                )
            registry[cls.name] = cls
    return registry
