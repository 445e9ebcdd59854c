"""The entry point of a tensor-parallel worker (ranks 1..N-1): ``python -m pagedserve.engine.tp_worker FD``.

Rank 0 (the engine) starts each worker as a plain subprocess holding one end of a socket pair, the
file descriptor ``FD``, and sends its :class:`WorkerSetup` down it. A subprocess rather than
``multiprocessing``: the engine process is daemonic, and multiprocessing refuses to start children
from a daemon. Like :mod:`pagedserve.engine.process_setup`, this module does not import torch: the
CPU thread settings (OpenMP's environment) must be in place before torch loads.

The worker exits when rank 0 tells it to, when rank 0 goes away (the socket closes) or when a step
fails on its side (rank 0 then sees it gone and fails the step).
"""

from __future__ import annotations

import pickle
import signal
import sys
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedserve.engine.config import EngineConfig
    from pagedserve.log_settings import ChildLogging


@dataclass(frozen=True)
class WorkerSetup:
    rank: int
    world_size: int
    store_port: int  # rank 0's TCPStore on localhost: the process group's rendezvous
    config: EngineConfig  # ``device`` is this rank's own
    architectures: bytes  # pickled: the classes' modules import torch
    logging: ChildLogging


def main(argv: list[str]) -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's; rank 0 stops us
    link = Connection(int(argv[1]))
    try:
        setup: WorkerSetup = link.recv()
    except EOFError:
        return 0  # rank 0 went away before we started
    setup.logging.install(tag=f"(tp rank {setup.rank}) ")
    from pagedserve.engine.process_setup import rank_cpu_threads, use_compile_cache, use_cpu_threads

    use_compile_cache(setup.config.compile_cache_dir)
    use_cpu_threads(rank_cpu_threads(setup.config))
    from pagedserve.engine.tp_follower import follow

    return follow(setup, pickle.loads(setup.architectures), link)


if __name__ == "__main__":
    sys.exit(main(sys.argv))
