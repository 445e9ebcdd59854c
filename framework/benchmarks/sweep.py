"""A sweep's results in one place: every job's rows in ``results.csv`` and ``results.json`` under the
sweep directory, and one PNG per swept key (each measured quantity against the key's values).

A job saves its rows beside the overrides that made it (``JOB_FILE`` in its own directory). When the
sweep ends, ``SweepResults`` (a Hydra callback, set in conf/bench.yaml) gathers them for
``bench -m ...``, whatever the sweeper (Hydra's basic grid or Optuna); the serving benchmark's own
sweep (``--serve-args cache.block_size=8,16``) calls ``write_sweep`` itself.

``objective`` is what ``bench`` returns to a sweeper: output tok/s, penalised below every run that
meets the bound when ``bench.ttft_p99_bound_ms`` is set and missed (see docs/benchmarks.md, Sweeps).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)

JOB_FILE = "sweep_job.json"
CSV_FILE = "results.csv"
JSON_FILE = "results.json"
# A plot with more lines than this is a cloud of points (an Optuna search): no legend, no lines.
MAX_LINES = 8


@dataclass(frozen=True)
class Measures:
    """What a benchmark's rows hold: the column telling one job's rows apart, and the quantities to
    plot (column → axis label)."""

    series: str
    metrics: dict[str, str]


BENCH = Measures(
    "system",
    {"output_tps": "output tok/s", "ttft_p99_ms": "TTFT p99 (ms)", "tpot_p99_ms": "TPOT p99 (ms)"},
)
SERVING = Measures(
    "rate",
    {"output_throughput": "output tok/s", "ttft_p99_ms": "TTFT p99 (ms)", "tpot_p99_ms": "TPOT p99 (ms)"},
)


# ---- a job --------------------------------------------------------------------------------------


def job_settings(overrides: Iterable[str]) -> dict[str, Any]:
    """A job's overrides as ``{key: value}``, values typed as Hydra parses them (8 → int)."""
    settings = {}
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        value = override.value()
        if not isinstance(value, str | int | float | bool) and value is not None:
            value = override.get_value_element_as_str()  # a list or dict: its text
        settings[override.key_or_group] = value
    return settings


def save_job(
    directory: Path,
    job: int,
    settings: dict[str, Any],
    rows: list[dict[str, Any]],
    objective: float | None = None,
) -> None:
    """``objective``: what the job returned to the sweeper, shown beside each of its rows."""
    record = {"job": job, "settings": settings, "rows": rows, "objective": objective}
    (directory / JOB_FILE).write_text(json.dumps(record, default=str))


def load_jobs(sweep_dir: Path) -> list[dict[str, Any]]:
    """Every job's record (``job``, ``settings``, ``rows``), in job order."""
    records = [json.loads(path.read_text()) for path in sweep_dir.glob(f"*/{JOB_FILE}")]
    return sorted(records, key=lambda r: r["job"])


def flatten(records: list[dict[str, Any]], swept: list[str]) -> list[dict[str, Any]]:
    """One flat row per job's row: job number, the swept keys' values, then the row."""
    return [
        {"job": r["job"], **{key: r["settings"].get(key) for key in swept}, **row}
        | ({"objective": r["objective"]} if r.get("objective") is not None else {})
        for r in records
        for row in r["rows"]
    ]


# ---- the sweep ----------------------------------------------------------------------------------


def swept_keys(overrides: Iterable[str], sweeper_params: dict[str, Any] | None = None) -> list[str]:
    """Keys the sweep varies: sweep syntax on the command line (``a=1,2``, ``choice(...)``,
    ``range(...)``), then those of ``hydra.sweeper.params`` (Optuna's search space in a config)."""
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    keys = [o.key_or_group for o in parsed if o.is_sweep_override()]
    return keys + [k for k in sweeper_params or {} if k not in keys]


def write_sweep(
    sweep_dir: Path, records: list[dict[str, Any]], swept: list[str], measures: Measures
) -> list[Path]:
    """results.csv, results.json and a PNG per swept key; returns the paths written."""
    rows = flatten(records, swept)
    paths = write_tables(sweep_dir, records, rows, swept, measures)
    try:
        from matplotlib.figure import Figure  # noqa: F401 - only to know whether plots can be drawn
    except ImportError:
        log.warning("sweep: no plots; they need matplotlib (pip install 'pagedserve[sweep]')")
        return paths
    return paths + [plot_key(sweep_dir, rows, key, swept, measures) for key in swept]


def write_tables(
    sweep_dir: Path,
    records: list[dict[str, Any]],
    rows: list[dict[str, Any]],
    swept: list[str],
    measures: Measures,
) -> list[Path]:
    """The CSV has a column per swept key; the JSON also keeps each job's full settings."""
    columns = list(dict.fromkeys(["job", *swept, measures.series, *(k for row in rows for k in row)]))
    csv_path, json_path = sweep_dir / CSV_FILE, sweep_dir / JSON_FILE
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, columns)
        writer.writeheader()
        writer.writerows(rows)
    jobs = [{"job": r["job"], "settings": r["settings"]} for r in records]
    document = {
        "swept": swept,
        "series": measures.series,
        "metrics": list(measures.metrics),
        "jobs": jobs,
        "rows": rows,
    }
    json_path.write_text(json.dumps(document, indent=1, default=str))
    return [csv_path, json_path]


# ---- plots --------------------------------------------------------------------------------------


def plot_key(
    sweep_dir: Path, rows: list[dict[str, Any]], key: str, swept: list[str], measures: Measures
) -> Path:
    """One figure for ``key``: a panel per measured quantity against the key's values; a line per
    series and combination of the other swept keys' values (each held as in its jobs)."""
    from matplotlib.figure import Figure

    metrics = {m: label for m, label in measures.metrics.items() if any(_number(r.get(m)) for r in rows)}
    rows = [r for r in rows if key in r]
    others = [k for k in swept if k != key]
    lines = _lines(rows, [measures.series, *others])
    numeric = all(isinstance(r[key], int | float) and not isinstance(r[key], bool) for r in rows)
    ticks = sorted({r[key] for r in rows}, key=lambda v: (not numeric, v if numeric else str(v)))
    figure = Figure(figsize=(4.5 * max(len(metrics), 1), 3.6), layout="constrained")
    axes = figure.subplots(1, max(len(metrics), 1), squeeze=False)[0]
    for ax, (metric, label) in zip(axes, metrics.items(), strict=False):
        for name, members in lines.items():
            points = [(r[key], _number(r.get(metric))) for r in members]
            points = sorted(
                ((x if numeric else ticks.index(x), y) for x, y in points if y is not None),
                key=lambda p: p[0],
            )
            style = "o" if len(lines) > MAX_LINES else "o-"
            ax.plot([x for x, _ in points], [y for _, y in points], style, label=name, markersize=4)
        _x_axis(ax, key, ticks, numeric)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if 1 < len(lines) <= MAX_LINES:
        axes[0].legend(fontsize="small")
    figure.suptitle(f"{key}: {len(rows)} rows of {len({r['job'] for r in rows})} jobs")
    path = sweep_dir / f"{_file_name(key)}.png"
    figure.savefig(path, dpi=110)
    return path


def _lines(rows: list[dict[str, Any]], by: list[str]) -> dict[str, list[dict[str, Any]]]:
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        name = ", ".join(f"{k}={row[k]}" if k != by[0] else str(row[k]) for k in by if k in row)
        lines.setdefault(name, []).append(row)
    return lines


def _x_axis(ax: Any, key: str, ticks: list[Any], numeric: bool) -> None:
    ax.set_xlabel(key)
    if not numeric:
        ax.set_xticks(range(len(ticks)), [str(t) for t in ticks])
        return
    # Block sizes and batch limits are swept in powers of two: spread them evenly.
    if ticks and ticks[0] > 0 and ticks[-1] / ticks[0] >= 8:
        ax.set_xscale("log", base=2)
    if len(ticks) <= 12:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        return None
    return float(value)


def _file_name(key: str) -> str:
    """A key as a file name: what is not a word character, dot or dash becomes ``_``."""
    return re.sub(r"[^\w.-]", "_", key).strip(".") or "key"


# ---- the objective ------------------------------------------------------------------------------


def objective(output_tps: float, ttft_p99_ms: float | None, bound_ms: float | None) -> float:
    """Output tok/s when there is no bound or the run meets it. A run over the bound gets
    ``-ttft_p99 / bound`` (≤ -1): below every run that meets it, and higher the closer it came, so a
    maximising search still has a slope towards the feasible region."""
    if bound_ms is None or (ttft_p99_ms is not None and ttft_p99_ms <= bound_ms):
        return output_tps
    if ttft_p99_ms is None or math.isnan(ttft_p99_ms):
        return -math.inf
    return -ttft_p99_ms / bound_ms


# ---- the table and the callback -------------------------------------------------------------------


def print_sweep(
    rows: list[dict[str, Any]], swept: list[str], measures: Measures, console: Console | None = None
) -> None:
    console = console or Console(width=200)
    columns = ["job", *swept, measures.series, *measures.metrics]
    first = next(iter(measures.metrics))
    if any(r.get("objective") not in (None, r.get(first)) for r in rows):  # a bound was set
        columns.append("objective")
    table = Table(title=f"Sweep: {len({r['job'] for r in rows})} jobs")
    for column in columns:
        table.add_column(column, justify="left" if column == measures.series else "right")
    for row in rows:
        table.add_row(*(_cell(row.get(c)) for c in columns))
    console.print(table)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:,.1f}"
    return "-" if value is None else str(value)


class SweepResults(Callback):
    """Hydra callback: when ``bench -m ...`` ends, its jobs' rows as one table, CSV, JSON and plots."""

    def __init__(self, measures: str = "bench") -> None:
        self.measures = {"bench": BENCH, "serving": SERVING}[measures]

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        records = load_jobs(sweep_dir) if sweep_dir.is_dir() else []
        if not records:
            # Jobs that fail stop the sweep before this; no rows means no job ran (range(0), ...).
            print(f"sweep: no job ran, nothing written under {sweep_dir}", file=sys.stderr)
            sys.exit(2)  # pagedserve.cli.EXIT_CONFIG: the command line asked for nothing
        params = OmegaConf.select(config, "hydra.sweeper.params")
        swept = swept_keys(config.hydra.overrides.task, OmegaConf.to_container(params) if params else None)
        print_sweep(flatten(records, swept), swept, self.measures)
        for path in write_sweep(sweep_dir, records, swept, self.measures):
            print(f"sweep: wrote {path}")
