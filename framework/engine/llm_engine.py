"""The LLM engine: requests in, one ``step()`` at a time, :class:`RequestOutput` values out.

``step()`` reads as schedule → launch → postprocess. On CUDA with ``async_scheduling`` the
postprocessing of a step waits until the next step has been scheduled and launched, so the host's
work (scheduling, input preparation, detokenization) overlaps the device's; a step's outputs are
then returned by the following ``step()`` call. The engine is not thread-safe; see
:mod:`pagedserve.engine.engine_loop` for running it on its own thread.
"""

from __future__ import annotations

import logging

import torch
from pagedserve.engine.attention import AttentionBackend, select_attention_backend
from pagedserve.engine.block_manager import BlockManager, BlockUsage
from pagedserve.engine.config import EngineConfig
from pagedserve.engine.grammar_compiles import GrammarCompiles
from pagedserve.engine.model_runner import ModelRunner, StepHandle
from pagedserve.engine.model_setup import ModelSetup, build_model, cpu_num_blocks, cuda_num_blocks
from pagedserve.engine.output_processor import OutputProcessor
from pagedserve.engine.outputs import RequestOutput
from pagedserve.engine.policy import SchedulingPolicy
from pagedserve.engine.registries import EngineRegistries
from pagedserve.engine.request import EngineRequest, build_request
from pagedserve.engine.sampler import Sampler
from pagedserve.engine.sampling_params import SamplingParams
from pagedserve.engine.scheduler import ScheduledBatch, Scheduler
from pagedserve.engine.sequence import Sequence
from pagedserve.engine.startup import StartupClock
from pagedserve.engine.structured_output import GrammarBackend, XGrammarBackend
from pagedserve.engine.tensor_parallel import TensorParallelRunner
from pagedserve.models.tokenizer import Tokenizer, read_eos_token_ids

log = logging.getLogger(__name__)

# How long an engine whose only requests wait for their grammar sleeps in a step: a command that
# arrives meanwhile (a new request, an abort) waits at most this long.
_IDLE_COMPILE_WAIT_S = 0.005


class LLMEngine:
    def __init__(self, config: EngineConfig, registries: EngineRegistries | None = None) -> None:
        self.config = config
        clock = StartupClock()
        registries = registries or EngineRegistries.builtin()
        with clock.phase("weights"):
            setup = build_model(config, registries.architectures)
        self.max_model_len = setup.max_model_len
        self.directory = setup.directory  # where config.json and the tokenizer live (None: built in)
        self.tokenizer = Tokenizer.from_dir(setup.directory) if setup.directory else None
        self.eos_token_ids = self._eos_ids(setup)
        self._check_budgets()
        backend_cls = select_attention_backend(
            registries.attention_backends,
            config.kernel,
            head_dim=setup.arch.head_dim,
            dtype=setup.dtype,
            block_size=config.cache.block_size,
            device=setup.device,
            kv_cache_dtype=setup.kv_cache_dtype,
        )
        self.device = setup.device
        self.workers = setup.workers  # tensor-parallel ranks 1..N-1 (None: one rank)
        self.attention_backend = backend_cls.name
        with clock.phase("warmup"):  # CUDA: the profiling prefill, the only kernels run at start
            num_blocks = self._num_blocks(setup, backend_cls)
        self.block_manager = BlockManager(
            num_blocks,
            config.cache.block_size,
            config.cache.prefix_caching,
            sliding_window=setup.model.kv_sliding_window(),
        )
        self.scheduler = Scheduler(
            config.scheduler,
            self.block_manager,
            self._policy(registries),
            max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids,
            vocab_size=setup.arch.vocab_size,
        )
        self.grammars = self._grammar_backend(setup)
        self.compiles = GrammarCompiles(self.grammars)
        sampler = Sampler(setup.arch.vocab_size, self.eos_token_ids, config.seed)
        with clock.phase("kv_cache"):
            self.runner = self._runner(setup, backend_cls, sampler, num_blocks, config.cuda_graphs)
        with clock.phase("cuda_graphs"):
            self.runner.capture_graphs()
        self.overlap = config.async_scheduling and setup.device.type == "cuda"
        self._inflight: tuple[ScheduledBatch, StepHandle] | None = None
        self.outputs = OutputProcessor(self.tokenizer)
        log.info(
            "engine ready: %s on %s (%s%s), %d KV blocks of %d tokens in %s, attention=%s",
            setup.arch.architecture,
            setup.device,
            setup.dtype,
            f", {config.quantization} linear weights" if config.quantization else "",
            num_blocks,
            config.cache.block_size,
            setup.kv_cache_dtype,
            backend_cls.name,
        )
        self.startup = clock.finish()
        log.info("%s", self.startup.describe())

    # ---- requests (make_request is safe to call from any thread) ---------------------------------

    def make_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
    ) -> EngineRequest:
        """Tokenize and validate; raises ``ValueError`` for a request the engine could never serve."""
        request = build_request(self.tokenizer, request_id, prompt, params, priority, self.max_model_len)
        self.check(request)
        return request

    def check(self, request: EngineRequest) -> None:
        """Raise ``ValueError`` for a request the engine could never serve."""
        self.scheduler.check_request(len(request.prompt_token_ids), request.params)

    def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        priority: int = 0,
    ) -> None:
        self.add(self.make_request(request_id, prompt, params, priority))

    def add(self, request: EngineRequest) -> None:
        if self.outputs.has(request.request_id):
            raise ValueError(f"request id {request.request_id!r} is already in use")
        params = request.params
        seq = Sequence(request.request_id, request.prompt_token_ids, params, priority=request.priority)
        if params.structured_outputs is not None:
            # Scheduled once its grammar has compiled on the pool (a step never waits for a compile).
            self.compiles.submit(seq, params.structured_outputs)
        else:
            self.scheduler.add(seq)
        self.outputs.add(request)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its blocks; returns its final output (``None`` if unknown)."""
        if not self.compiles.abort(request_id):
            self.scheduler.abort(request_id)
        return self.outputs.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        if self.scheduler.has_unfinished() or self.compiles:
            return True
        # A launched step whose sequences all ended meanwhile (abort) has nothing left to report.
        return self._inflight is not None and any(not s.is_finished for s, _ in self._inflight[0].sample_rows)

    def block_usage(self) -> BlockUsage:
        return self.block_manager.usage()

    # ---- one step ----------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        try:
            return self._step()
        except BaseException:
            self._inflight = None  # its results are lost with the failed step
            raise

    def _step(self) -> list[RequestOutput]:
        self._admit_compiled()
        outputs: list[RequestOutput] = []
        if self._inflight is not None and _needs_full_history(self._inflight[0]):
            # Penalties, bad words and grammars read every earlier token on the host: land the
            # pending ones first.
            outputs += self._complete(*self._inflight)
            self._inflight = None
        batch = self.scheduler.schedule()
        previous, self._inflight = self._inflight, None
        if not batch.is_empty:
            self._inflight = (batch, self.runner.launch(batch))
        if previous is not None:
            outputs += self._complete(*previous)
        if not self.overlap and self._inflight is not None:
            outputs += self._complete(*self._inflight)
            self._inflight = None
        return outputs + self._fail_compiles()

    # ---- after a step that raised ------------------------------------------------------------------

    def requeue_running(self) -> list[str]:
        """Put every running request back to waiting, its computed KV given up (as a preemption
        does); returns those that may have been in the failed step."""
        self._inflight = None
        return self.scheduler.requeue_running()

    def device_failed(self) -> bool:
        """A CUDA error (a device-side assert...) is sticky: nothing more runs on the device in this
        process, whichever request it ran for."""
        if self.workers is not None and self.workers.broken is not None:
            return True  # a tensor-parallel rank is gone: no step can run until all start again
        if self.device.type != "cuda":
            return False
        try:
            torch.cuda.synchronize(self.device)
        except Exception:  # noqa: BLE001 - the error itself was logged where the step raised
            return True
        return False

    def step_alone(self, request_id: str) -> list[RequestOutput]:
        """Requeue what runs, then step with only ``request_id`` scheduled, each step completed before
        the next, until it has a new token or has finished; raises what such a step raises."""
        self.requeue_running()  # alone: no other request keeps blocks the probe may need
        overlap, self.overlap = self.overlap, False
        self.scheduler.only = request_id
        outputs: list[RequestOutput] = []
        try:
            for _ in range(self.max_model_len):  # every step computes at least one of its tokens
                if not self.outputs.has(request_id) or any(o.request_id == request_id for o in outputs):
                    return outputs
                outputs += self.step()
            raise RuntimeError(f"request {request_id} made no progress when run alone")
        finally:
            self.overlap, self.scheduler.only = overlap, None

    def _admit_compiled(self) -> None:
        """Hand the sequences whose grammar is ready to the scheduler."""
        if not self.compiles:
            return
        if not self.scheduler.has_unfinished() and self._inflight is None:
            self.compiles.wait(_IDLE_COMPILE_WAIT_S)  # nothing else to run: sleep rather than spin
        for seq in self.compiles.take_ready():
            self.scheduler.add(seq)

    def _fail_compiles(self) -> list[RequestOutput]:
        """End the requests whose grammar did not compile (after the step, so that a step that raises
        leaves them for the next one rather than losing their outputs)."""
        outputs = []
        for failure in self.compiles.take_failed():
            seq = failure.seq
            self.outputs.abort(seq.request_id)  # forgets it: the request produced nothing
            outputs.append(
                RequestOutput(seq.request_id, seq.token_ids, [], True, failure.message, failure.code)
            )
        return outputs

    def _complete(self, batch: ScheduledBatch, handle: StepHandle) -> list[RequestOutput]:
        samples = self.runner.collect(handle)
        updated = self.scheduler.postprocess(batch, samples)
        return self.outputs.process(updated, self.scheduler)

    # ---- set-up helpers ----------------------------------------------------------------------------

    def _eos_ids(self, setup: ModelSetup) -> frozenset[int]:
        if self.tokenizer is not None:
            return self.tokenizer.eos_token_ids
        if setup.directory is not None:
            return frozenset(read_eos_token_ids(setup.directory))
        return frozenset(setup.arch.eos_token_ids)

    def _grammar_backend(self, setup: ModelSetup) -> GrammarBackend | None:
        if self.tokenizer is None or setup.directory is None:
            return None
        return XGrammarBackend(setup.directory / "tokenizer.json", setup.arch.vocab_size, self.eos_token_ids)

    def _check_budgets(self) -> None:
        scheduler = self.config.scheduler
        if not scheduler.chunked_prefill and scheduler.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"scheduler.max_num_batched_tokens ({scheduler.max_num_batched_tokens}) must be "
                f">= max_model_len ({self.max_model_len}) when scheduler.chunked_prefill is off"
            )

    def _policy(self, registries: EngineRegistries) -> SchedulingPolicy:
        name = self.config.scheduler.policy
        if name not in registries.scheduling_policies:
            raise ValueError(
                f"scheduler.policy={name!r} is not a registered scheduling policy; "
                f"registered: {sorted(registries.scheduling_policies)}"
            )
        return registries.scheduling_policies[name]()

    def _num_blocks(self, setup: ModelSetup, backend_cls: type[AttentionBackend]) -> int:
        cache = self.config.cache
        if cache.num_blocks is not None:
            return cache.num_blocks
        if setup.device.type == "cuda":
            return cuda_num_blocks(cache, setup, self._profile_activation_bytes(setup, backend_cls))
        return cpu_num_blocks(cache, setup, self.config.scheduler.max_num_seqs * self.max_model_len)

    def _runner(
        self,
        setup: ModelSetup,
        backend_cls: type[AttentionBackend],
        sampler: Sampler,
        num_blocks: int,
        cuda_graphs: bool,
    ) -> ModelRunner:
        scheduler = self.config.scheduler
        runner_cls = ModelRunner if setup.workers is None else TensorParallelRunner
        return runner_cls(
            setup.model,
            backend_cls(),
            sampler,
            num_blocks=num_blocks,
            block_size=self.config.cache.block_size,
            device=setup.device,
            kv_cache_dtype=setup.kv_cache_dtype,
            max_num_seqs=scheduler.max_num_seqs,
            max_num_batched_tokens=scheduler.max_num_batched_tokens,
            max_model_len=self.max_model_len,
            cuda_graphs=cuda_graphs,
        )

    def _profile_activation_bytes(self, setup: ModelSetup, backend_cls: type[AttentionBackend]) -> int:
        """Peak activation memory of the largest step (one long prefill) with a throw-away cache."""
        num_tokens = min(self.config.scheduler.max_num_batched_tokens, self.max_model_len - 1)
        block_size = self.config.cache.block_size
        num_blocks = -(-num_tokens // block_size)
        sampler = Sampler(setup.arch.vocab_size, frozenset(), self.config.seed)
        runner = self._runner(setup, backend_cls, sampler, num_blocks, cuda_graphs=False)
        seq = Sequence("profile", [0] * num_tokens, SamplingParams(max_tokens=1))
        seq.block_table = list(range(num_blocks))
        torch.cuda.synchronize(setup.device)
        baseline = torch.cuda.memory_allocated(setup.device)
        torch.cuda.reset_peak_memory_stats(setup.device)
        runner.run(ScheduledBatch([seq], [num_tokens], [(seq, 0)]))
        peak = torch.cuda.max_memory_allocated(setup.device) - baseline
        del runner
        torch.cuda.empty_cache()
        return peak


def _needs_full_history(batch: ScheduledBatch) -> bool:
    return any(seq.params.needs_full_history for seq, _ in batch.sample_rows)
