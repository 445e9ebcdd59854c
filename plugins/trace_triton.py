"""The ``triton`` trace exporter: Triton's JSON trace file.

The file is a JSON array; each trace contributes an object naming its model and version, one object
per timestamp, and (at ``TENSORS`` level) one per tensor, all keyed by the trace ``id``, the layout
Triton's ``trace_summary.py`` reads. With ``log_frequency`` N > 0 every N traces go to a new file
``<trace_file>.<index>`` (0, 1, ...); with 0 everything is written to ``<trace_file>`` at shutdown.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from pagedserve.config import TracingConfig
from pagedserve.hookspecs import hookimpl
from pagedserve.tracing import Trace, TraceExporter

log = logging.getLogger(__name__)


class TritonTraceExporter(TraceExporter):
    name = "triton"
    writes_file = True

    def __init__(self, config: TracingConfig) -> None:
        super().__init__(config)
        self.path = config.file
        self._pending: list[dict[str, Any]] = []
        self._num_pending = 0
        self._index = 0
        self._rotating = config.log_frequency > 0
        self._warned = False

    def export(self, trace: Trace) -> None:
        if not self.path:
            if not self._warned:
                log.warning("tracing is on but tracing.file is not set: traces are dropped")
                self._warned = True
            return
        self._pending.extend(trace_entries(trace))
        self._num_pending += 1
        self._rotating = trace.log_frequency > 0
        if self._rotating and self._num_pending >= trace.log_frequency:
            self._write_rotated()

    def _write_rotated(self) -> None:
        self._write(Path(f"{self.path}.{self._index}"))
        self._index += 1

    def _write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write aside, then rename: a reader never sees a half-written file.
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(self._pending) + "\n", encoding="utf-8")
        os.replace(partial, path)
        self._pending = []
        self._num_pending = 0

    def close(self) -> None:
        if not self.path or not self._num_pending:
            return
        if self._rotating or self._index:
            self._write_rotated()
        else:
            self._write(Path(self.path))


def trace_entries(trace: Trace) -> list[dict[str, Any]]:
    """One trace in Triton's JSON layout (timestamps in time order)."""
    entries: list[dict[str, Any]] = [
        {
            "id": trace.id,
            "model_name": trace.model_name,
            "model_version": trace.model_version,
            "request_id": trace.request_id,
            "parent_id": 0,
        }
    ]
    for name, ns in sorted(trace.timestamps, key=lambda item: item[1]):
        entries.append({"id": trace.id, "timestamps": [{"name": name, "ns": ns}]})
    for tensor in trace.tensors:
        entries.append(
            {
                "id": trace.id,
                "activity": tensor.activity,
                "tensor": {
                    "name": tensor.name,
                    "data": tensor.data,
                    "shape": ",".join(str(d) for d in tensor.shape),
                    "dtype": tensor.datatype,
                },
            }
        )
    return entries


@hookimpl
def pagedserve_trace_exporters() -> list[type[TraceExporter]]:
    return [TritonTraceExporter]
