"""Sweeps experimenters can read: ``bench -m ...`` (Hydra's grid or Optuna) and the serving benchmark
over several settings write every job's rows to results.csv / results.json under the sweep directory
and a PNG per swept key; bad sweeps exit 2 (a configuration error) with nothing half-written."""

from __future__ import annotations

import csv
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pagedserve.benchmarks import sweep

from .conftest import REPO

# A handful of short requests: each job is a second or two of tiny-llama on CPU.
SMALL = ["bench.peers=[]", "bench.num_requests=4", "bench.prompt_len=[16,32]", "bench.output_len=[4,8]"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bench(*args: str, cwd: Path, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", "from pagedserve.cli import bench; bench()", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


# ---- the pieces, on made-up jobs ------------------------------------------------------------------


def test_job_settings_keep_hydras_types() -> None:
    settings = sweep.job_settings(
        ["cache.block_size=8", "scheduler=priority", "bench.prompt_len=[16,32]", "cache.memory_fraction=0.5"]
    )
    assert settings == {
        "cache.block_size": 8,
        "scheduler": "priority",
        "bench.prompt_len": "[16,32]",
        "cache.memory_fraction": 0.5,
    }


def test_swept_keys_come_from_sweep_syntax_and_sweeper_params() -> None:
    overrides = [
        "cache.block_size=8,16",
        "model=tiny-llama",
        "scheduler.max_num_seqs=range(2,8,2)",
        "x=choice(a)",
    ]
    assert sweep.swept_keys(overrides) == ["cache.block_size", "scheduler.max_num_seqs", "x"]
    params = {"scheduler.max_num_batched_tokens": "choice(512,1024)", "cache.block_size": "choice(8,16)"}
    assert sweep.swept_keys(["bench.num_requests=4"], params) == list(params)


def test_objective_ranks_every_run_under_the_bound_above_every_run_over_it() -> None:
    assert sweep.objective(900.0, 50.0, None) == 900.0
    assert sweep.objective(900.0, 50.0, 100.0) == 900.0
    assert sweep.objective(900.0, 100.0, 100.0) == 900.0  # on the bound meets it
    slow_but_close = sweep.objective(5000.0, 150.0, 100.0)
    far = sweep.objective(9000.0, 400.0, 100.0)
    assert slow_but_close == pytest.approx(-1.5) and far == pytest.approx(-4.0)
    assert sweep.objective(1.0, 99.0, 100.0) > slow_but_close > far  # feasible first, then closeness
    assert sweep.objective(900.0, None, 100.0) == -math.inf  # nothing measured cannot meet a bound


def _records() -> list[dict[str, Any]]:
    """A 2 × 2 grid over block size and max_num_seqs, two systems per job, as jobs save them."""
    records = []
    for job, (block, seqs) in enumerate([(8, 4), (8, 8), (16, 4), (16, 8)]):
        rows = [
            {
                "system": "pagedserve",
                "output_tps": 100.0 * block + seqs,
                "ttft_p99_ms": 10.0 * seqs,
                "tpot_p99_ms": 2.0,
            },
            {"system": "hf_generate", "output_tps": 50.0, "ttft_p99_ms": None, "tpot_p99_ms": None},
        ]
        settings = {"cache.block_size": block, "scheduler.max_num_seqs": seqs, "model": "tiny-llama"}
        records.append({"job": job, "settings": settings, "rows": rows, "objective": rows[0]["output_tps"]})
    return records


def test_grid_gives_one_csv_row_per_job_row_and_a_plot_per_swept_key(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from matplotlib.image import imread

    swept = ["cache.block_size", "scheduler.max_num_seqs"]
    for record in _records():
        (tmp_path / str(record["job"])).mkdir()
        sweep.save_job(tmp_path / str(record["job"]), **record)
    records = sweep.load_jobs(tmp_path)
    paths = sweep.write_sweep(tmp_path, records, swept, sweep.BENCH)
    assert [p.name for p in paths] == [
        "results.csv",
        "results.json",
        "cache.block_size.png",
        "scheduler.max_num_seqs.png",
    ]
    rows = _csv(tmp_path / "results.csv")
    assert list(rows[0])[:4] == ["job", "cache.block_size", "scheduler.max_num_seqs", "system"]
    assert "model" not in rows[0]  # held keys stay in results.json
    assert [(r["job"], r["cache.block_size"], r["scheduler.max_num_seqs"], r["system"]) for r in rows] == [
        (str(j), str(b), str(s), system)
        for j, (b, s) in enumerate([(8, 4), (8, 8), (16, 4), (16, 8)])
        for system in ("pagedserve", "hf_generate")
    ]
    assert float(rows[6]["output_tps"]) == 1608.0 and rows[7]["ttft_p99_ms"] == ""
    assert float(rows[6]["objective"]) == 1608.0
    document = json.loads((tmp_path / "results.json").read_text())
    assert document["swept"] == swept and len(document["rows"]) == 8
    assert document["jobs"][3] == {"job": 3, "settings": _records()[3]["settings"]}
    for png in paths[2:]:
        assert png.read_bytes()[:8] == PNG_MAGIC
        height, width = imread(png).shape[:2]
        assert width > 3 * height  # three panels side by side: tok/s, TTFT, TPOT


def test_hostile_keys_and_values_stay_inside_the_sweep_and_round_trip(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    key, odd = "+../../evil/key", 'a,"b"\nc'
    records = [
        {"job": job, "settings": {key: value}, "rows": [{"system": "pagedserve", "output_tps": 10.0 + job}]}
        for job, value in enumerate([odd, "plain"])
    ]
    paths = sweep.write_sweep(tmp_path, records, [key], sweep.BENCH)
    assert all(p.parent == tmp_path for p in paths)
    assert paths[-1].name == "_.._.._evil_key.png" and paths[-1].read_bytes()[:8] == PNG_MAGIC
    assert [r[key] for r in _csv(tmp_path / "results.csv")] == [odd, "plain"]


def test_a_search_cloud_and_categorical_values_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    swept = ["scheduler", "scheduler.max_num_seqs"]
    records = [
        {
            "job": job,
            "settings": {"scheduler": ("fcfs", "priority")[job % 2], "scheduler.max_num_seqs": 2 + job},
            "rows": [{"system": "pagedserve", "output_tps": float(job), "ttft_p99_ms": float("nan")}],
        }
        for job in range(20)  # more lines than a legend can hold: drawn as points
    ]
    paths = sweep.write_sweep(tmp_path, records, swept, sweep.BENCH)
    assert [p.name for p in paths[2:]] == ["scheduler.png", "scheduler.max_num_seqs.png"]


def test_without_matplotlib_the_tables_are_still_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails
    paths = sweep.write_sweep(tmp_path, _records(), ["cache.block_size"], sweep.BENCH)
    assert [p.name for p in paths] == ["results.csv", "results.json"]
    assert len(_csv(tmp_path / "results.csv")) == 8


# ---- real sweeps ------------------------------------------------------------------------------------


def test_bench_multirun_writes_every_jobs_rows_and_a_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "sweep"
    result = _bench(
        "-m",
        "cache.block_size=8,16,32",
        "scheduler.max_num_seqs=4",
        *SMALL,
        f"hydra.sweep.dir={out}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Sweep: 3 jobs" in result.stdout
    rows = _csv(out / "results.csv")
    assert [(r["job"], r["cache.block_size"], r["system"]) for r in rows] == [
        ("0", "8", "pagedserve"),
        ("1", "16", "pagedserve"),
        ("2", "32", "pagedserve"),
    ]
    assert "scheduler.max_num_seqs" not in rows[0]  # held, not swept
    for row in rows:
        assert row["settings"].startswith(f"block={row['cache.block_size']} ")  # the job's own config
        assert int(row["output_tokens"]) == int(rows[0]["output_tokens"]) > 0  # same workload each
        assert float(row["output_tps"]) > 0
        ttft50, ttft99 = float(row["ttft_p50_ms"]), float(row["ttft_p99_ms"])
        assert 0 < ttft50 <= ttft99 <= float(row["seconds"]) * 1000
        assert 0 < float(row["tpot_p50_ms"]) <= float(row["tpot_p99_ms"])
        assert float(row["objective"]) == pytest.approx(float(row["output_tps"]))  # no bound set
    document = json.loads((out / "results.json").read_text())
    assert [r["output_tps"] for r in document["rows"]] == [
        pytest.approx(float(r["output_tps"])) for r in rows
    ]
    assert document["jobs"][0]["settings"]["scheduler.max_num_seqs"] == 4
    assert (out / "cache.block_size.png").read_bytes()[:8] == PNG_MAGIC
    assert not (out / "scheduler.max_num_seqs.png").exists()
    assert (out / "2" / "bench_results.jsonl").is_file()  # each job's own file, as before


def test_optuna_search_returns_the_penalised_objective(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    pytest.importorskip("matplotlib")
    out, bound = tmp_path / "search", 1e-3  # no run can answer in a microsecond: every one is penalised
    result = _bench(
        "-m",
        "hydra/sweeper=throughput_search",
        "hydra.sweeper.n_trials=2",
        f"bench.ttft_p99_bound_ms={bound}",
        *SMALL,
        f"hydra.sweep.dir={out}",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = _csv(out / "results.csv")
    keys = ["cache.block_size", "scheduler.max_num_seqs", "scheduler.max_num_batched_tokens"]
    assert list(rows[0])[1:4] == keys and len(rows) == 2
    for row in rows:
        assert float(row["objective"]) == pytest.approx(-float(row["ttft_p99_ms"]) / bound)
    best = yaml.safe_load((out / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(float(r["objective"]) for r in rows))
    assert all((out / f"{key}.png").is_file() for key in keys)


def test_unknown_swept_key_is_a_config_error(tmp_path: Path) -> None:
    result = _bench("-m", "cache.nope=1,2", *SMALL, f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "nope" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "s" / "results.csv").exists()


@pytest.mark.parametrize("empty", ["cache.block_size=range(0)", "cache.block_size=range(8,8)"])
def test_empty_sweep_exits_2_and_writes_nothing(tmp_path: Path, empty: str) -> None:
    result = _bench("-m", empty, *SMALL, f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert result.returncode == 2
    assert "no job ran" in result.stderr
    assert not (tmp_path / "s" / "results.csv").exists()


@pytest.mark.parametrize(
    "bad",
    [
        "cache.block_size=choice()",
        "cache.block_size=8,",
        "bench.ttft_p99_bound_ms=-1",
        "bench.ttft_p99_bound_ms=0",
    ],
)
def test_malformed_sweeps_and_bounds_exit_2(tmp_path: Path, bad: str) -> None:
    result = _bench("-m", bad, *SMALL, f"hydra.sweep.dir={tmp_path / 's'}", cwd=tmp_path)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_a_bad_value_met_after_a_job_ran_is_still_a_config_error(tmp_path: Path) -> None:
    # One job per batch: Hydra composes the second job only after the first has run.
    result = _bench(
        "-m",
        "hydra.sweeper.max_batch_size=1",
        "scheduler.max_num_seqs=4,oops",
        *SMALL,
        f"hydra.sweep.dir={tmp_path / 's'}",
        cwd=tmp_path,
    )
    assert (tmp_path / "s" / "0" / sweep.JOB_FILE).is_file()  # the first job ran
    assert result.returncode == 2
    assert "oops" in result.stderr


# ---- the serving benchmark over several settings ----------------------------------------------------


def test_serving_sweep_expands_like_hydras_basic_sweeper() -> None:
    from pagedserve.benchmarks import serving

    assert serving.sweep_settings(["kernel=torch"]) == [["kernel=torch"]]
    assert serving.sweep_settings(
        ["cache.block_size=8,16", "scheduler.max_num_seqs=2,4", "kernel=torch"]
    ) == [
        ["cache.block_size=8", "scheduler.max_num_seqs=2", "kernel=torch"],
        ["cache.block_size=8", "scheduler.max_num_seqs=4", "kernel=torch"],
        ["cache.block_size=16", "scheduler.max_num_seqs=2", "kernel=torch"],
        ["cache.block_size=16", "scheduler.max_num_seqs=4", "kernel=torch"],
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["cache.nope=1,2"], "Could not override 'cache.nope'"),
        (["cache.block_size=range(0)"], "no combination"),
        (["cache.block_size=8,0"], "sweep job 1 (cache.block_size=0)"),  # found before job 0 runs
        (["cache.block_size=["], "--serve-args"),
    ],
)
def test_bad_serving_sweeps_exit_2_before_any_server_starts(
    tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "s"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pagedserve.benchmarks.serving",
            "--sweep-dir",
            str(out),
            "--serve-args",
            *args,
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.slow
def test_serving_sweep_writes_rows_per_setting_and_rate(tmp_path: Path) -> None:
    pytest.importorskip("tritonclient.grpc.aio")
    pytest.importorskip("matplotlib")
    from pagedserve.benchmarks import serving

    out = tmp_path / "serving"
    serving.main(
        ["--serve-args", "cache.block_size=8,16", "--num-requests", "3", "--prompt-len", "16", "48",
         "--output-len", "4", "8", "--rates", "inf", "--no-warmup", "--sweep-dir", str(out)]
    )  # fmt: skip
    rows = _csv(out / "results.csv")
    assert [(r["job"], r["cache.block_size"], r["rate"]) for r in rows] == [
        ("0", "8", "inf"),
        ("0", "8", "offline"),
        ("1", "16", "inf"),
        ("1", "16", "offline"),
    ]
    for row in rows:
        assert row["completed"] == "3" and row["failed"] == "0" and float(row["output_throughput"]) > 0
    for row in rows[::2]:
        assert 0 < float(row["ttft_p50_ms"]) <= float(row["ttft_p99_ms"])
    assert (out / "cache.block_size.png").read_bytes()[:8] == PNG_MAGIC
    assert json.loads((out / "1" / "serving.json").read_text())["overrides"] == ["cache.block_size=16"]
