"""Loads plugins from the ``pagedserve.plugins`` entry-point group and gathers name-keyed registries.

Built-in plugins (``pagedserve_plugins.*``) are declared in our own pyproject under the same group, so
they load exactly like third-party ones and can be blocked the same way (``plugins.disable=[name]``).
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar

import pluggy
from pagedserve import hookspecs

if TYPE_CHECKING:
    from pagedserve.backend import ModelBackend
    from pagedserve.batching import BatchingPolicy
    from pagedserve.engine.attention import AttentionBackend
    from pagedserve.engine.policy import SchedulingPolicy
    from pagedserve.engine.routing import RoutingPolicy
    from pagedserve.frontends import Frontend
    from pagedserve.models.registry import ModelArchitecture

T = TypeVar("T")


class RegistryError(KeyError):
    def __str__(self) -> str:
        return str(self.args[0])


class Registry(Generic[T]):
    """Implementations of one kind, by name; remembers which plugin provided each."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        self._providers: dict[str, str] = {}

    def add(self, item: T, provider: str) -> None:
        name = getattr(item, "name", None)
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.kind} {item!r} from plugin '{provider}' has no 'name' class attribute")
        if name in self._items:
            raise ValueError(
                f"{self.kind} '{name}' from plugin '{provider}' is already provided by plugin "
                f"'{self._providers[name]}'"
            )
        self._items[name] = item
        self._providers[name] = provider

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise RegistryError(
                f"unknown {self.kind} '{name}'; available: {', '.join(sorted(self._items)) or 'none'}"
            ) from None

    def names(self) -> list[str]:
        return list(self._items)

    def items(self) -> dict[str, T]:
        return dict(self._items)

    def provider(self, name: str) -> str:
        return self._providers[name]

    def __contains__(self, name: object) -> bool:
        return name in self._items


@dataclass(frozen=True)
class PluginInfo:
    name: str
    module: str
    distribution: str
    version: str


class PluginHost:
    """A pluggy manager plus the registries built from its hooks. One per process (or per test)."""

    def __init__(self, disable: Iterable[str] = (), autoload: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: list[PluginInfo] = []
        self.disabled = sorted(set(disable))
        for name in self.disabled:
            self.pm.set_blocked(name)
        if autoload:
            self._load_entry_points()
        self.pm.check_pending()

    def _load_entry_points(self) -> None:
        for ep in sorted(
            importlib.metadata.entry_points(group=hookspecs.ENTRY_POINT_GROUP), key=lambda e: e.name
        ):
            if self.pm.is_blocked(ep.name) or self.pm.has_plugin(ep.name):
                continue
            try:
                plugin = ep.load()
            except Exception as error:
                raise RuntimeError(f"plugin '{ep.name}' ({ep.value}) failed to import: {error}") from error
            self.register(
                plugin, ep.name, ep.dist.name if ep.dist else "?", ep.dist.version if ep.dist else "?"
            )

    def register(self, plugin: object, name: str, distribution: str = "local", version: str = "") -> None:
        """Register a plugin object (a module with hookimpls); used by entry points and by tests."""
        if self.pm.is_blocked(name):
            return
        self.pm.register(plugin, name=name)
        self.plugins.append(
            PluginInfo(name, getattr(plugin, "__name__", repr(plugin)), distribution, version)
        )

    def registry(self, kind: str, hook: Callable[..., list[list[T]]]) -> Registry[T]:
        """Call a registration hook and collect every plugin's answer into a registry."""
        registry: Registry[T] = Registry(kind)
        for impl in reversed(hook.get_hookimpls()):  # type: ignore[attr-defined]
            for item in impl.function() or []:
                registry.add(item, impl.plugin_name)
        return registry

    @property
    def hook(self) -> pluggy.HookRelay:
        return self.pm.hook

    def registries(self) -> Registries:
        hook = self.pm.hook
        return Registries(
            model_backends=self.registry("model backend", hook.pagedserve_model_backends),
            batching_policies=self.registry("batching policy", hook.pagedserve_batching_policies),
            attention_backends=self.registry("attention backend", hook.pagedserve_attention_backends),
            scheduling_policies=self.registry("scheduling policy", hook.pagedserve_scheduling_policies),
            model_architectures=self.registry("model architecture", hook.pagedserve_model_architectures),
            trace_exporters=self.registry("trace exporter", hook.pagedserve_trace_exporters),
            frontends=self.registry("front-end", hook.pagedserve_frontends),
            routing_policies=self.registry("routing policy", hook.pagedserve_routing_policies),
        )


@dataclass(frozen=True)
class Registries:
    """Every implementation the loaded plugins provide, by kind and name."""

    model_backends: Registry[type[ModelBackend]]
    batching_policies: Registry[type[BatchingPolicy]]
    attention_backends: Registry[type[AttentionBackend]]
    scheduling_policies: Registry[type[SchedulingPolicy]]
    model_architectures: Registry[type[ModelArchitecture]]
    trace_exporters: Registry[type]
    frontends: Registry[type[Frontend]]
    routing_policies: Registry[type[RoutingPolicy]]
