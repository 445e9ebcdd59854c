"""Issue 15 item 1 groundwork: the persistent Triton kernel cache and the start-up time by phase.

CPU tests: ``engine.compile_cache_dir`` is checked with the config (naming the key), becomes
``TRITON_CACHE_DIR`` where the engine runs, and the engine logs its start-up phases. The GPU test
fails while a step after start-up still compiles a Triton kernel (the next session's work).
"""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from pagedserve.config import EngineSettings
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.engine_process import EngineProcess
from pagedserve.engine.llm import LLM
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.startup import StartupPhases
from pagedserve.models.tiny import ensure_tiny_llama

from .engine_helpers import engine_config

KEY = "engine.compile_cache_dir"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return ensure_tiny_llama(tmp_path_factory.mktemp("t") / "tiny")


def test_default_is_under_the_user_cache():
    assert EngineSettings().compile_cache_dir.endswith(".cache/pagedserve/triton")
    assert EngineConfig(model="tiny-llama").compile_cache_dir == EngineSettings().compile_cache_dir


@pytest.mark.parametrize("make", [EngineSettings, lambda **kw: EngineConfig(model="tiny-llama", **kw)])
def test_a_file_is_refused_naming_the_key(tmp_path, make):
    file = tmp_path / "not-a-folder"
    file.write_text("x")
    with pytest.raises(ValueError, match=f"{KEY}.*is a file"):
        make(compile_cache_dir=str(file))
    with pytest.raises(ValueError, match=f"{KEY}=.*cannot be created"):
        make(compile_cache_dir=str(file / "below" / "a" / "file"))


def test_empty_and_new_folders_are_accepted(tmp_path):
    assert EngineSettings(compile_cache_dir="").compile_cache_dir == ""
    new = tmp_path / "a" / "b"
    EngineSettings(compile_cache_dir=str(new))
    assert not new.exists()  # checked, not created: the engine's process creates it


def test_triton_reads_the_folder_set_before_it_loads(tmp_path):
    folder = tmp_path / "kernels"
    script = (
        "from pagedserve.engine.process_setup import use_compile_cache\n"
        f"use_compile_cache({str(folder)!r})\n"
        "import triton\n"
        "print(triton.knobs.cache.dir)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(folder)
    assert folder.is_dir()


def test_the_engine_process_uses_the_configured_folder(tiny, tmp_path):
    folder = tmp_path / "cache" / "triton"
    engine = EngineProcess(engine_config(tiny, compile_cache_dir=str(folder)))
    try:
        engine.start()
        assert folder.is_dir()  # created by the engine process, where TRITON_CACHE_DIR was set
    finally:
        engine.stop()


def test_start_up_phases_are_logged_and_kept(tiny, caplog):
    caplog.set_level(logging.INFO, logger="pagedserve.engine.llm_engine")
    engine = LLMEngine(engine_config(tiny))
    phases = engine.startup
    assert isinstance(phases, StartupPhases)
    assert phases.weights > 0
    assert phases.cuda_graphs < 0.01 and phases.warmup < 0.5  # no GPU phase runs on the CPU
    assert phases.total >= phases.weights + phases.kv_cache + phases.warmup
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("start-up:"))
    for label in ("weights", "KV cache", "kernel warm-up", "CUDA graphs", "total"):
        assert label in line


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.xfail(strict=False, reason="issue 15 item 1: kernel variants still compile on first use")
def test_no_triton_compile_after_start(tiny):
    import triton

    config = engine_config(tiny, device="cuda", dtype="bfloat16", kernel="triton", num_blocks=None)
    llm = LLM(config)
    compiled: list[str] = []

    def count(*, key: str, fn, **_: object) -> None:
        compiled.append(f"{fn.name} {key}")

    triton.knobs.runtime.jit_post_compile_hook = count
    try:
        # the workload's shapes: lone and batched decodes, short and long prompts, a chunked prefill
        for batch, prompt_len, max_tokens in [(1, 5, 8), (7, 33, 4), (64, 17, 16), (3, 600, 2)]:
            prompts = [[(i * 31 + j) % 200 + 3 for j in range(prompt_len)] for i in range(batch)]
            llm.generate(prompts, SamplingParams(max_tokens=max_tokens, ignore_eos=True))
    finally:
        triton.knobs.runtime.jit_post_compile_hook = None
    assert compiled == [], f"{len(compiled)} Triton kernels compiled after start-up: {compiled[:5]}"
