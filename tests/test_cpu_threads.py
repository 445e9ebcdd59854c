"""``engine.cpu_threads``: validation, the automatic count, what the engine process and ``bench`` apply."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException
from pagedserve.benchmarks.throughput import settings_label
from pagedserve.config import BackendSettings, EngineSettings
from pagedserve.engine import process_setup
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.engine_process import EngineProcess
from pagedserve.repository import ModelRepository
from pagedserve_plugins.llm_backend import LLMBackend

from .test_config import compose_config


@pytest.fixture
def torch_threads() -> Iterator[None]:
    """Puts this process's torch threads back: other tests in this worker expect theirs."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


# ---- configuration ---------------------------------------------------------------------------------


def test_the_key_composes_and_defaults_to_automatic() -> None:
    assert compose_config().engine.cpu_threads is None
    assert compose_config("engine.cpu_threads=3").engine.cpu_threads == 3
    assert compose_config("engine.cpu_threads=null").engine.cpu_threads is None


@pytest.mark.parametrize("value", [0, -1])
def test_out_of_range_counts_name_the_key(value: int) -> None:
    with pytest.raises(ValueError, match=rf"engine\.cpu_threads must be a positive integer.*got {value}"):
        compose_config(f"engine.cpu_threads={value}")
    with pytest.raises(ValueError, match=r"^cpu_threads must be a positive integer"):
        EngineConfig(model="tiny-llama", cpu_threads=value)


@pytest.mark.parametrize("value", ["two", "1.5"])
def test_non_integer_counts_are_refused(value: str) -> None:
    with pytest.raises(ConfigCompositionException, match=rf"override engine\.cpu_threads={value}"):
        compose_config(f"engine.cpu_threads={value}")


def test_the_setting_reaches_the_engine_config() -> None:
    config = compose_config("engine.cpu_threads=3")
    spec = ModelRepository(config.repository_path()).read("tiny-llama")
    engine_config = LLMBackend.engine_config(spec, BackendSettings.from_config(config))
    assert engine_config.cpu_threads == 3
    assert LLMBackend.engine_config(spec, BackendSettings()).cpu_threads is None


def test_bench_rows_name_a_chosen_count_only() -> None:
    default = "block=16 sched=fcfs kernel=auto"
    assert settings_label(compose_config()) == default
    assert settings_label(compose_config("engine.cpu_threads=2")) == default + " threads=2"


# ---- the automatic count ---------------------------------------------------------------------------


def _fake_cpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, siblings: dict[int, str]) -> None:
    for cpu, shared in siblings.items():
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "thread_siblings_list").write_text(shared + "\n")
    monkeypatch.setattr(process_setup, "SYSFS_CPUS", tmp_path)
    monkeypatch.setattr(process_setup.os, "sched_getaffinity", lambda pid: set(siblings), raising=False)


def test_hyperthread_siblings_count_as_one_core(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_cpus(monkeypatch, tmp_path, {0: "0,4", 1: "1,5", 4: "0,4", 5: "1,5", 2: "2"})
    assert process_setup.usable_cores() == 3
    assert process_setup.resolve_cpu_threads(None) == 2  # one core left to the server


def test_a_single_core_still_gets_a_thread(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_cpus(monkeypatch, tmp_path, {3: "3"})
    assert process_setup.resolve_cpu_threads(None) == 1


def test_a_chosen_count_is_taken_as_given(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _fake_cpus(monkeypatch, tmp_path, {0: "0", 1: "1"})
    assert process_setup.resolve_cpu_threads(5) == 5  # oversubscribing is the operator's call


# ---- applying it -----------------------------------------------------------------------------------


def test_in_process_sets_torch_threads_but_not_the_environment(
    torch_threads: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch is loaded here, so OpenMP has read its environment already: writing it would change nothing.
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    assert process_setup.use_cpu_threads(2) == torch.get_num_threads() == 2
    assert process_setup.use_cpu_threads(1) == torch.get_num_threads() == 1
    assert "OMP_WAIT_POLICY" not in process_setup.os.environ


def test_engine_process_sets_its_threads_before_torch_loads(
    capfd: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # the child logs at this process's level; its lines go to stderr
    process = EngineProcess(EngineConfig(model="tiny-llama", device="cpu", cpu_threads=1))
    process.stop(timeout=30)
    engine_lines = [line for line in capfd.readouterr().err.splitlines() if "(engine)" in line]
    threads = [line for line in engine_lines if "CPU threads:" in line]
    assert len(threads) == 1, engine_lines
    assert "CPU threads: 1 intra-op (engine.cpu_threads=1;" in threads[0]
    assert threads[0].endswith("OpenMP wait: PASSIVE")
    assert not [line for line in engine_lines if "torch loaded before" in line]


def test_engine_settings_refuse_zero_directly() -> None:
    with pytest.raises(ValueError, match=r"engine\.cpu_threads"):
        EngineSettings(cpu_threads=0)


def test_tensor_parallel_ranks_share_the_automatic_cpu_threads(monkeypatch) -> None:
    import dataclasses

    from pagedserve.engine import process_setup
    from pagedserve.engine.config import EngineConfig

    monkeypatch.setattr(process_setup, "usable_cores", lambda: 9)
    base = EngineConfig(model="tiny-llama", device="cpu")
    assert process_setup.rank_cpu_threads(base) is None  # one rank: the automatic count (8)
    tp4 = dataclasses.replace(base, tensor_parallel_size=4)
    assert process_setup.rank_cpu_threads(tp4) == 2  # 8 threads over 4 ranks
    assert (
        process_setup.rank_cpu_threads(dataclasses.replace(tp4, cpu_threads=3)) == 3
    )  # an explicit count stays
