"""What a person sees at start-up: a rich table of models like Triton's, and the plugin list."""

from __future__ import annotations

import logging

from pagedserve.model_manager import IndexEntry
from pagedserve.plugin_manager import PluginHost, Registries
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

# soft_wrap: a message stays one line (greppable) whatever the width; tables still fit the width.
console = Console(stderr=True, soft_wrap=True)

_STATE_STYLE = {"READY": "green", "UNAVAILABLE": "red", "LOADING": "yellow", "UNLOADING": "yellow"}


def setup_logging(level: int = logging.INFO) -> None:
    """Rich output on a terminal, plain lines otherwise (logs, CI)."""
    handler: logging.Handler
    if console.is_terminal:
        handler = RichHandler(console=console, show_path=False, rich_tracebacks=True)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname).1s %(name)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def model_table(rows: list[IndexEntry]) -> Table:
    table = Table(title="Models", title_justify="left")
    table.add_column("Model", style="bold")
    table.add_column("Version")
    table.add_column("Status")
    table.add_column("Reason", overflow="fold")
    for row in rows:
        if not row.state:
            continue  # in the repository but never asked for; Triton's table leaves these out too
        style = _STATE_STYLE.get(row.state, "")
        table.add_row(row.name, row.version, f"[{style}]{row.state}[/]", row.reason)
    return table


def plugin_table(host: PluginHost, registries: Registries) -> Table:
    table = Table(title="Plugins", title_justify="left")
    for column in ("Plugin", "Module", "Distribution", "Version", "Provides"):
        table.add_column(column)
    provides: dict[str, list[str]] = {}
    for field in registries.__dataclass_fields__:
        registry = getattr(registries, field)
        for name in registry.names():
            provides.setdefault(registry.provider(name), []).append(f"{registry.kind}: {name}")
    for info in host.plugins:
        table.add_row(
            info.name, info.module, info.distribution, info.version, "\n".join(provides.get(info.name, []))
        )
    if host.disabled:
        table.caption = "disabled: " + ", ".join(host.disabled)
    return table
