"""Triton's log settings (LogSettings RPC, ``logging.*`` config) applied live to Python logging.

``log_info`` / ``log_warning`` / ``log_error`` switch those levels on and off; ``log_verbose_level`` N
lets through verbose records down to ``logging.DEBUG - (N - 1)`` (so level 1 is DEBUG, and code can log
finer detail with :func:`verbose`); ``log_format`` picks the plain-line layout (``default``, or
``ISO8601`` UTC timestamps). ``log_file`` is fixed at start-up. Rich's terminal handler keeps its own
layout; only plain lines change format. An engine process logs plain lines under the settings in
effect when it starts (:func:`child_logging`). Nothing here knows about protobuf.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from typing import Any

from pagedserve.config import LogFormat, LoggingConfig
from pagedserve.errors import InferenceError

log = logging.getLogger(__name__)

# Our loggers; verbose records of third-party libraries stay filtered by the root logger (INFO).
_OWN_LOGGERS = ("pagedserve", "pagedserve_plugins")
_DEFAULT_LAYOUT = "%(asctime)s %(levelname).1s %(name)s] %(message)s"


def verbose(level: int) -> int:
    """The Python logging level of Triton verbose level ``level`` (>= 1)."""
    return logging.DEBUG - (level - 1)


@dataclass
class LogSettings:
    file: str
    info: bool
    warning: bool
    error: bool
    verbose_level: int
    format: str

    @classmethod
    def from_config(cls, config: LoggingConfig) -> LogSettings:
        return cls(
            config.file, config.info, config.warning, config.error, config.verbose_level, config.format.value
        )


class _ISO8601Formatter(logging.Formatter):
    """``2026-11-24T17:24:23Z I pagedserve.server] message`` (UTC, like Triton's ISO8601 format)."""

    converter = time.gmtime

    def __init__(self, layout: str = _DEFAULT_LAYOUT) -> None:
        super().__init__(layout, "%Y-%m-%dT%H:%M:%SZ")


def plain_formatter(log_format: str, tag: str = "") -> logging.Formatter:
    """The plain-line formatter of ``logging.format``; ``tag`` goes before each message (``(engine) ``)."""
    layout = _DEFAULT_LAYOUT.replace("%(message)s", tag + "%(message)s")
    return _ISO8601Formatter(layout) if log_format == LogFormat.ISO8601.value else logging.Formatter(layout)


@dataclass(frozen=True)
class ChildLogging:
    """How a child process (the engine's) logs: as this process's plain lines, to the same place,
    through the same switches. Taken when the child starts; a later LogSettings update does not
    reach it."""

    level: int
    """This process's root level."""
    settings: LogSettings | None
    """What this process's LogController applied; None without one (``bench``, tests): plain
    default lines on stderr at ``level``."""

    def install(self, tag: str) -> None:
        s = self.settings
        # A file the server also writes is opened for appending: each line is one write, so the two
        # processes' lines never overwrite each other.
        handler = logging.FileHandler(s.file, encoding="utf-8") if s and s.file else logging.StreamHandler()
        handler.setFormatter(plain_formatter(s.format if s else LogFormat.default.value, tag))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel(self.level)
        if s is not None:
            handler.addFilter(_SettingsFilter(s))
            _set_own_levels(s)


# A copy of what the latest LogController applied, for child processes started from now on.
_applied: LogSettings | None = None


def child_logging() -> ChildLogging:
    """This process's log settings, for a child process about to start."""
    return ChildLogging(logging.getLogger().getEffectiveLevel(), _applied)


def _set_own_levels(settings: LogSettings) -> None:
    level = verbose(settings.verbose_level) if settings.verbose_level else logging.INFO
    for name in _OWN_LOGGERS:
        logging.getLogger(name).setLevel(level)


class _SettingsFilter(logging.Filter):
    """Drops records whose level the current settings switch off."""

    def __init__(self, settings: LogSettings) -> None:
        super().__init__()
        self.settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        s = self.settings
        if record.levelno >= logging.ERROR:
            return s.error
        if record.levelno >= logging.WARNING:
            return s.warning
        if record.levelno >= logging.INFO:
            return s.info
        return s.verbose_level > 0 and record.levelno >= verbose(s.verbose_level)


class LogController:
    """Owns the live settings and applies them to the root logger's handlers."""

    def __init__(self, config: LoggingConfig) -> None:
        self.settings = LogSettings.from_config(config)
        self._filter = _SettingsFilter(self.settings)

    def install(self) -> None:
        """Attach to the handlers ``console.setup_logging`` installed (or a file, if configured)."""
        root = logging.getLogger()
        if self.settings.file:
            handler = logging.FileHandler(self.settings.file, encoding="utf-8")
            root.handlers[:] = [handler]
        for handler in root.handlers:
            if self._filter not in handler.filters:
                handler.addFilter(self._filter)
        self.apply()

    def apply(self) -> None:
        global _applied
        _set_own_levels(self.settings)
        for handler in logging.getLogger().handlers:
            if _is_plain(handler):
                handler.setFormatter(plain_formatter(self.settings.format))
        _applied = dataclasses.replace(self.settings)

    def render(self) -> dict[str, tuple[str, Any]]:
        """Every key with its protobuf oneof field, as LogSettings returns them."""
        s = self.settings
        return {
            "log_file": ("string_param", s.file),
            "log_info": ("bool_param", s.info),
            "log_warning": ("bool_param", s.warning),
            "log_error": ("bool_param", s.error),
            "log_verbose_level": ("uint32_param", s.verbose_level),
            "log_format": ("string_param", s.format),
        }

    def update(self, changes: dict[str, tuple[str | None, Any]]) -> None:
        """Apply a LogSettings update given as ``{key: (oneof field, value)}``; Triton's texts on errors.
        Unknown keys are ignored; nothing changes unless every key is valid."""
        if "log_file" in changes:
            raise InferenceError.unimplemented(
                "log file location can not be updated through network protocol"
            )
        new: dict[str, Any] = {}
        for key in ("log_info", "log_warning", "log_error"):
            if key in changes:
                new[key.removeprefix("log_")] = _expect(
                    changes[key], "bool_param", f"expect boolean for '{key}'"
                )
        if "log_verbose_level" in changes:
            new["verbose_level"] = _expect(
                changes["log_verbose_level"], "uint32_param", "expect int32 for 'log_verbose_level'"
            )
        if "log_format" in changes:
            fmt = _expect(changes["log_format"], "string_param", "expect string for 'log_format'")
            if fmt not in (LogFormat.default.value, LogFormat.ISO8601.value):
                raise InferenceError(f"invalid argument for log_format, got: {fmt}")
            new["format"] = fmt
        for attr, value in new.items():
            setattr(self.settings, attr, value)
        self.apply()
        log.debug("log settings now %s", self.settings)  # shows once verbose level 1 is on


def _expect(setting: tuple[str | None, Any], kind: str, message: str) -> Any:
    if setting[0] != kind:
        raise InferenceError(message)
    return setting[1]


def _is_plain(handler: logging.Handler) -> bool:
    try:
        from rich.logging import RichHandler
    except ImportError:
        return True
    return not isinstance(handler, RichHandler)
