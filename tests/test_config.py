"""The Hydra configuration: composition, typed validation and the exact command lines we document."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf
from pagedserve.benchmarks.throughput import settings_label
from pagedserve.config import ModelControlMode, ServeConfig, register_configs

from .conftest import REPO


def compose_config(*overrides: str) -> ServeConfig:
    register_configs(ConfigStore.instance())
    with initialize_config_module(config_module="pagedserve.conf", version_base=None):
        cfg = compose(config_name="config", overrides=list(overrides))
    config = OmegaConf.to_object(cfg)
    assert isinstance(config, ServeConfig)
    return config


def test_documented_command_line_parses() -> None:
    config = compose_config("model=llama3", "scheduler=fcfs", "cache.block_size=16")
    assert config.startup_models() == ["llama3"]
    assert config.scheduler.policy == "fcfs"
    assert config.cache.block_size == 16


@pytest.mark.parametrize("dtype", ["auto", "fp8", "fp8_e4m3", "fp8_e5m2"])
def test_every_kv_cache_dtype_composes(dtype: str) -> None:
    assert compose_config(f"cache.dtype={dtype}").cache.dtype == dtype


def test_bench_settings_name_a_narrow_kv_cache() -> None:
    assert settings_label(compose_config()) == "block=16 sched=fcfs kernel=auto"
    assert settings_label(compose_config("cache.dtype=fp8")) == "block=16 sched=fcfs kernel=auto kv=fp8"
    both = compose_config("cache.dtype=fp8", "engine.quantization=fp8")
    assert settings_label(both) == "block=16 sched=fcfs kernel=auto w=fp8 kv=fp8"


def test_defaults() -> None:
    config = compose_config()
    assert config.server.grpc_port == 8001
    assert config.model_control_mode is ModelControlMode.none
    assert config.startup_models() is None
    assert (config.repository_path() / "simple.yaml").is_file()


@pytest.mark.parametrize("option", ["fcfs", "priority", "shortest_prompt"])
def test_every_scheduler_option_composes(option: str) -> None:
    assert compose_config(f"scheduler={option}").scheduler.policy == option


def test_model_list_and_modes() -> None:
    config = compose_config("model=[simple,repeat_int32]", "model_control_mode=explicit")
    assert config.startup_models() == ["simple", "repeat_int32"]
    assert config.model_control_mode is ModelControlMode.explicit


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cache.block_size=7", "cache.block_size must be one of [1, 8, 16, 32, 64, 128]"),
        ("server.grpc_port=70000", "server.grpc_port must be in [0, 65535]"),
        ("model_control_mode=sometimes", "model_control_mode"),
        ("cache.block_size=abc", "block_size"),
        ("cache.dtype=bad", "cache.dtype must be one of ['auto', 'fp8', 'fp8_e4m3', 'fp8_e5m2'], got 'bad'"),
        ("engine.quantization=int4", "engine.quantization must be one of [None, 'fp8'], got 'int4'"),
        ("engine.dtype=float64", "engine.dtype must be one of ['auto', 'float32', 'float16', 'bfloat16']"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(Exception, match=None) as info:
        compose_config(override)
    assert message in str(info.value)


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pagedserve", *args], capture_output=True, text=True, cwd=REPO, timeout=120
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["server.grpc_prot=1"], "grpc_prot"),  # unknown key
        (["scheduler=nope"], "scheduler/nope"),  # unknown group option
        (["model_control_mode=sometimes"], "explicit"),  # bad enum value: the allowed ones
        (["cache.block_size=abc"], "block_size"),  # wrong type
        (["cache.block_size=7"], "cache.block_size must be one of"),  # refused by the schema
        (["repository=/nonexistent/models"], "/nonexistent/models"),
        (["server.tls.cert=/nonexistent/cert.pem", "server.tls.key=/nonexistent/key.pem"], "server.tls.cert"),
    ],
)
def test_every_configuration_error_exits_2_naming_it(args: list[str], named: str) -> None:
    result = _serve(*args, "check=true")
    assert result.returncode == 2, result.stdout + result.stderr
    assert named in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_multirun_runs_each_job(tmp_path) -> None:  # noqa: ANN001
    result = _serve(
        "-m",
        "check=true",
        "model=simple",
        "scheduler=fcfs,priority",
        f"hydra.sweep.dir={tmp_path}",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("pagedserve: check passed: 1 model version(s) READY") == 2
    assert "listening" not in result.stdout  # a check opens no port
