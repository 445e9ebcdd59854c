"""CPU threads for a process that runs an LLM engine, set before torch does any work.

torch's default is one intra-op thread per core the process may run on, none left for the server, and
OpenMP threads that spin for a while after every parallel region before they sleep.
An engine step is thousands of small parallel regions; when another process holds a core (the
server's event loop and response encoding, a neighbour's job), each region waits for its descheduled
thread, and the idle threads' spinning takes the cores the others need. On a 2-core machine beside
two busy loops the tiny-llama ``bench`` ran 10-60x slower (docs/benchmarks.md).

So an engine gets ``engine.cpu_threads`` intra-op threads (automatic: the usable cores less one for
the server), one inter-op thread (the engine forks no inter-op work), and, in its own process,
``OMP_WAIT_POLICY=PASSIVE``. OpenMP reads that only once, when torch loads, which is why this module
must not import torch and why the engine process starts here (:func:`engine_process_main`) rather than
in pagedserve.engine.engine_process, whose imports load torch.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import signal
import sys
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedserve.engine.config import EngineConfig
    from pagedserve.log_settings import ChildLogging

log = logging.getLogger(__name__)

_WAIT_POLICY = "PASSIVE"
SYSFS_CPUS = Path("/sys/devices/system/cpu")


def usable_cores() -> int:
    """Physical cores among the CPUs this process may run on; hyperthread siblings count once (two
    threads of one GEMM on one core only compete for its units)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # not Linux: no affinity, no sysfs
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            cores.add((SYSFS_CPUS / f"cpu{cpu}" / "topology" / "thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def resolve_cpu_threads(configured: int | None) -> int:
    """``engine.cpu_threads``, or when unset the usable cores less one: the server's event loop, gRPC
    threads and response encoding keep one core busy while the engine steps. At least one."""
    return configured if configured is not None else max(1, usable_cores() - 1)


def rank_cpu_threads(config: EngineConfig) -> int | None:
    """One tensor-parallel rank's ``engine.cpu_threads``: on the CPU the ranks share the automatic
    count (N ranks of ``cores - 1`` threads each would oversubscribe the machine N times)."""
    if config.cpu_threads is not None or config.tensor_parallel_size == 1 or config.device.startswith("cuda"):
        return config.cpu_threads
    return max(1, resolve_cpu_threads(None) // config.tensor_parallel_size)


def openmp_environment(threads: int) -> dict[str, str]:
    """What OpenMP (and MKL's OpenMP layer) must see when torch loads."""
    return {"OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": _WAIT_POLICY}


def use_cpu_threads(configured: int | None) -> int:
    """Give torch the engine's thread counts in this process; returns torch's intra-op count.

    Where torch has not loaded yet, OpenMP's threads are told to sleep while they wait. Where it has
    (the server or ``bench``, whose plugins import it first), the wait policy stays what the
    environment said: OpenMP reads it only at load."""
    threads = resolve_cpu_threads(configured)
    if "torch" not in sys.modules:
        os.environ.update(openmp_environment(threads))
    import torch

    torch.set_num_threads(threads)
    # Settable once per process, before any inter-op work: a second engine here finds it set.
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)
    return torch.get_num_threads()


def use_compile_cache(folder: str) -> None:
    """Point Triton's kernel cache at ``engine.compile_cache_dir`` in this process, before anything
    imports triton: a fresh server then loads the kernels an earlier one compiled. ``""``: Triton's
    default. The folder was checked with the config; it is created here, where it is used."""
    if not folder:
        return
    path = Path(folder).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TRITON_CACHE_DIR"] = str(path)


def wait_policy() -> str:
    return os.environ.get("OMP_WAIT_POLICY", "default (spin, then sleep)")


def engine_process_main(
    config: EngineConfig,
    registries: bytes,
    commands: Connection,
    outputs: Connection,
    logging_setup: ChildLogging,
) -> None:
    """The engine process's entry point. ``registries`` come pickled: they name plugin classes whose
    modules import torch, so they may load only after the environment is set."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's to handle; it stops us
    logging_setup.install(tag="(engine) ")
    loaded_early = "torch" in sys.modules  # a parent __main__ that imports torch is re-run in a child
    use_compile_cache(config.compile_cache_dir)
    threads = use_cpu_threads(rank_cpu_threads(config))
    log.info(
        "CPU threads: %d intra-op (engine.cpu_threads=%s; %d usable cores), 1 inter-op; OpenMP wait: %s",
        threads,
        "null" if config.cpu_threads is None else config.cpu_threads,
        usable_cores(),
        wait_policy(),
    )
    if loaded_early:
        log.warning("torch loaded before the engine process set OMP_WAIT_POLICY: idle threads may spin")
    from pagedserve.engine.engine_process import child_main

    child_main(config, pickle.loads(registries), commands, outputs)
