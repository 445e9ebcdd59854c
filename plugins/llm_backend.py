"""The ``llm`` model backend: the paged-KV engine behind the Triton vLLM backend's interface.

Inputs ``text_input``, ``stream``, ``sampling_parameters`` (JSON; string values coerced as the vLLM
backend does; falls back to the request's parameters), ``exclude_input_in_output`` and the
``return_*`` flags; outputs ``text_output`` and the optional ``finish_reason``,
``cumulative_logprob``, ``logprobs``, ``num_input_tokens``, ``num_output_tokens``.

Admission: the worker thread that calls :meth:`LLMModel.execute` parses and checks each request
before it costs anything (``engine.max_prompt_bytes``, the sampling parameters' ranges, ``n``, the
``scheduler.max_waiting`` budget: UNAVAILABLE beyond it), then tokenizes a short prompt itself and
hands a long one to the model's tokenizer thread, so a long prompt never holds up the short ones
behind it (the tokenizer releases the GIL on long texts).

Threads: the engine runs in its own process (:class:`EngineProcess`, ``engine.separate_process``,
the default) or on its own thread (:class:`EngineLoop`); the output thread turns engine outputs into
responses and encodes them, so protocol work overlaps with model steps. When responses are produced
faster than they go out, the output thread folds a request's queued outputs into one response, and
holds a stream's next piece while its previous response is still unwritten (:class:`StreamPacer`): a
slow stream gets bigger pieces instead of a growing backlog.
"""

from __future__ import annotations

import functools
import json
import logging
import queue
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from pagedserve.backend import LoadContext, Model, ModelBackend, ModelSpec
from pagedserve.chat_template import ChatTemplate
from pagedserve.errors import InferenceError
from pagedserve.hookspecs import hookimpl
from pagedserve.inference import InferenceRequest, InferenceResponse
from pagedserve.metrics import EngineMetricsSnapshot, EngineState, LLMMetrics, RequestTimer
from pagedserve.model_config_check import BOOLEAN, check_parameters
from pagedserve.replica_metrics import ReplicaState
from pagedserve_plugins.llm_replicas import replica_configs, start_engines

if TYPE_CHECKING:
    from pagedserve.config import BackendSettings
    from pagedserve.engine.config import EngineConfig
    from pagedserve.engine.engine_loop import EngineLoop
    from pagedserve.engine.engine_process import EngineProcess
    from pagedserve.engine.outputs import CompletionOutput, RequestOutput
    from pagedserve.engine.registries import EngineRegistries
    from pagedserve.engine.replicas import ReplicaSet
    from pagedserve.engine.routing import RoutingPolicy
    from pagedserve.engine.sampling_params import SamplingParams
    from pagedserve.models.tokenizer import Tokenizer
    from pagedserve.protocol import model_config_pb2

log = logging.getLogger(__name__)

# name, data type, dims, optional: exactly the vLLM backend's auto-completed config.
INPUTS = [
    ("text_input", "TYPE_STRING", [1], False),
    ("stream", "TYPE_BOOL", [1], True),
    ("sampling_parameters", "TYPE_STRING", [1], True),
    ("exclude_input_in_output", "TYPE_BOOL", [1], True),
    ("return_finish_reason", "TYPE_BOOL", [1], True),
    ("return_cumulative_logprob", "TYPE_BOOL", [1], True),
    ("return_logprobs", "TYPE_BOOL", [1], True),
    ("return_num_input_tokens", "TYPE_BOOL", [1], True),
    ("return_num_output_tokens", "TYPE_BOOL", [1], True),
]
OUTPUTS = [
    ("text_output", "TYPE_STRING", [-1]),
    ("finish_reason", "TYPE_STRING", [-1]),
    ("cumulative_logprob", "TYPE_FP32", [-1]),
    ("logprobs", "TYPE_STRING", [-1]),
    ("num_input_tokens", "TYPE_UINT32", [1]),
    ("num_output_tokens", "TYPE_UINT32", [-1]),
    # Our extension: with the sampling parameter prompt_logprobs, the prompt's log-probabilities
    # as JSON (one entry per prompt token, the first null), in the first response.
    ("prompt_logprobs", "TYPE_STRING", [1]),
]
_OPTIONAL_OUTPUTS = {
    "return_finish_reason": "finish_reason",
    "return_cumulative_logprob": "cumulative_logprob",
    "return_logprobs": "logprobs",
    "return_num_input_tokens": "num_input_tokens",
    "return_num_output_tokens": "num_output_tokens",
}
_ERROR_PREFIX = "Error generating stream: "
# The config parameters this backend reads (name -> allowed values; None: any). Any other name fails
# the load, as an unknown engine argument fails Triton's vLLM backend. ENABLE_VLLM_HEALTH_CHECK is
# accepted for configs brought from Triton: the engine's health is always watched (Model.failure).
PARAMETERS: dict[str, tuple[str, ...] | None] = {
    "weights": None,
    "preset": None,
    "REPORT_CUSTOM_METRICS": BOOLEAN,
    "ENABLE_VLLM_HEALTH_CHECK": BOOLEAN,
    "unary_decoupled": BOOLEAN,
    # Replaces the tokenizer's chat template (the openai front-end renders it).
    "chat_template": None,
    # Data-parallel replicas (pagedserve_plugins.llm_replicas); the policy checks its values at load.
    "routing_policy": None,
    "routing_prefix_blocks": None,
    "routing_max_imbalance": None,
}
# Longer prompts are tokenized on the model's tokenizer thread, not on the thread that admits
# requests: about 50 ms of tokenizing at most holds up the requests behind one.
_INLINE_PROMPT_CHARS = 64 * 1024


class LLMBackend(ModelBackend):
    name = "llm"

    @classmethod
    def auto_complete(cls, config: model_config_pb2.ModelConfig) -> None:
        from pagedserve.protocol import model_config_pb2 as mc

        if config.max_batch_size != 0:
            raise ValueError(f"max_batch_size must be 0 for the llm backend, got {config.max_batch_size}")
        config.model_transaction_policy.decoupled = True
        have_inputs = {i.name for i in config.input}
        for name, data_type, dims, optional in INPUTS:
            if name not in have_inputs:
                config.input.add(
                    name=name, data_type=mc.DataType.Value(data_type), dims=dims, optional=optional
                )
        have_outputs = {o.name for o in config.output}
        for name, data_type, dims in OUTPUTS:
            if name not in have_outputs:
                config.output.add(name=name, data_type=mc.DataType.Value(data_type), dims=dims)
        # Our documented extension: unary ModelInfer with stream=false gets the whole text at once.
        config.parameters["unary_decoupled"].string_value = "true"
        check_parameters(config, PARAMETERS, cls.name)

    def load(self, spec: ModelSpec, context: LoadContext) -> Model:
        config = self.engine_config(spec, context.settings)
        registries = engine_registries(context.settings)
        # instance_group: one engine configuration per data-parallel replica (pagedserve_plugins.llm_replicas)
        configs = replica_configs(spec, config, context.settings.engine)
        loop: EngineLoop | EngineProcess | ReplicaSet
        if context.settings.engine.separate_process:
            loop = start_engines(spec, configs, context.settings, registries)
        else:
            config = configs[0]  # a single replica: several need separate processes
            from pagedserve.engine.engine_loop import EngineLoop
            from pagedserve.engine.llm_engine import LLMEngine
            from pagedserve.engine.process_setup import use_compile_cache, use_cpu_threads

            use_cpu_threads(config.cpu_threads)  # process-wide: the server's threads too
            use_compile_cache(config.compile_cache_dir)
            loop = EngineLoop(LLMEngine(config, registries))
        loop.start()
        settings = context.settings
        model = LLMModel(
            loop, settings.engine.max_prompt_bytes, settings.scheduler.max_waiting, config.max_model_len
        )
        model.chat_template_override = spec.parameter("chat_template")
        return model

    @staticmethod
    def engine_config(spec: ModelSpec, settings: BackendSettings) -> EngineConfig:
        """The engine configuration for one model YAML under the server's settings (also used by
        ``bench``)."""
        from pagedserve.engine.config import EngineConfig
        from pagedserve.models.presets import PRESETS

        engine = settings.engine
        weights = _weights(spec, engine.weights or "")
        model = weights
        if not (weights and (weights == "tiny-llama" or Path(weights).expanduser().is_dir())):
            preset = spec.parameter("preset")
            if engine.load_format == "dummy" and preset in PRESETS:
                model = preset  # type: ignore[assignment]
            else:
                where = f"'{weights}' is not a directory" if weights else "no weights directory is set"
                raise ValueError(
                    f"model '{spec.name}' cannot load: {where}. Set engine.weights=/path/to/hf_model "
                    "(a Hugging Face directory with config.json, *.safetensors and tokenizer.json), or "
                    f"run its architecture with random weights: engine.load_format=dummy"
                )
        return EngineConfig(
            model=model,
            dtype=engine.dtype,
            device=engine.device,
            load_format=engine.load_format,
            kernel=settings.kernel,
            cuda_graphs=settings.cuda_graphs,
            max_model_len=engine.max_model_len,
            quantization=engine.quantization,
            seed=engine.seed,
            cpu_threads=engine.cpu_threads,
            tensor_parallel_size=engine.tensor_parallel_size,
            compile_cache_dir=engine.compile_cache_dir,
            cache=settings.cache,
            scheduler=settings.scheduler,
        )


def _weights(spec: ModelSpec, engine_weights: str) -> str:
    """The weights directory: the YAML's ``parameters.weights`` or else the operator's
    ``engine.weights``. A relative YAML path resolves inside the model repository (and may not leave
    it); an absolute one is the operator's choice, as ``engine.weights`` is. A config override never
    sets it (:mod:`pagedserve.model_config_check`)."""
    weights = spec.parameter("weights")
    if not weights:
        return engine_weights
    if Path(weights).expanduser().is_absolute():
        return weights
    local = spec.model_file(weights, "parameters.weights")
    if weights == "tiny-llama" and not local.exists():
        return weights  # the embedded model, built from fixed seeds
    return str(local)


def coalesce(items: list[Any]) -> list[Any]:
    """One ``(active, output)`` per request (see :func:`merge_by_request`). ``None`` (stop) ends the
    list: what came before it is answered, then the output thread stops."""
    from pagedserve.engine.outputs import merge_by_request

    stop = None in items
    if stop:
        items = items[: items.index(None)]
    actives = {output.request_id: active for active, output in items}
    merged = [(actives[o.request_id], o) for o in merge_by_request([o for _, o in items])]
    return [*merged, (None, None)] if stop else merged


class StreamPacer:
    """Keeps a stream's unfinished output back while its previous response is unwritten, folding the
    next output into it (as vLLM's per-request collector merges what a slow consumer has not taken):
    a stream that falls behind gets fewer, bigger responses, and the server never queues more than
    one response per stream."""

    def __init__(self, may_wait: Callable[[Any, RequestOutput], bool]) -> None:
        self.may_wait = may_wait
        self._held: dict[str, tuple[Any, RequestOutput]] = {}

    @property
    def holding(self) -> bool:
        return bool(self._held)

    def pace(self, items: list[Any]) -> list[Any]:
        """``items`` coalesced, less what must wait, plus held outputs whose client caught up. The
        stop marker stays last and releases everything."""
        merged = coalesce(items)
        stop = bool(merged) and merged[-1][0] is None
        ready = []
        for active, output in merged[:-1] if stop else merged:
            earlier = self._held.pop(output.request_id, None)
            if earlier is not None:
                output = earlier[1].merge_into(output)
            if self.may_wait(active, output):
                self._held[output.request_id] = (active, output)
            else:
                ready.append((active, output))
        for request_id, (active, output) in list(self._held.items()):
            if stop or not self.may_wait(active, output):
                del self._held[request_id]
                ready.append((active, output))
        return [*ready, (None, None)] if stop else ready


def engine_registries(settings: BackendSettings) -> EngineRegistries:
    from pagedserve.engine.registries import EngineRegistries

    registries = settings.registries
    if registries is None:
        return EngineRegistries.builtin()
    return EngineRegistries(
        attention_backends=registries.attention_backends.items(),
        scheduling_policies=registries.scheduling_policies.items(),
        architectures=registries.model_architectures.items(),
    )


@dataclass
class _Active:
    """One request in the engine, as the output thread tracks it."""

    request: InferenceRequest
    engine_id: str
    prompt: str
    stream: bool
    exclude_input: bool
    wanted: set[str]
    params: SamplingParams
    logprobs_sent: dict[int, int] = field(default_factory=dict)
    aborted: bool = False
    started: bool = False  # has had an engine output: no longer counts against max_waiting
    timer: RequestTimer = field(default_factory=RequestTimer)
    add_special_tokens: bool = True


class LLMModel(Model):
    chat_template_override: str | None = None

    def __init__(
        self,
        loop: EngineLoop | EngineProcess | ReplicaSet,
        max_prompt_bytes: int = 2**20,
        max_waiting: int = 1024,
        max_model_len: int | None = None,
    ) -> None:
        self.loop = loop
        self.max_prompt_bytes = max_prompt_bytes
        self.max_waiting = max_waiting
        self._num_waiting = 0  # accepted requests without an engine output yet
        self._tokenizer_thread = ThreadPoolExecutor(1, thread_name_prefix="pagedserve-llm-tokenize")
        self._outputs: queue.Queue[tuple[_Active, RequestOutput] | None] = queue.Queue()
        self._pacer = StreamPacer(_may_wait)
        self._active: dict[str, _Active] = {}
        self._lock = threading.Lock()
        self.metrics = LLMMetrics(max_model_len)  # token-count buckets run up to the context length
        self._thread = threading.Thread(target=self._output_thread, name="pagedserve-llm-output", daemon=True)
        self._thread.start()

    # -- requests in (worker thread) --------------------------------------------------------------

    def execute(self, requests: list[InferenceRequest]) -> None:
        for request in requests:
            try:
                active = self._accept(request)
            except (ValueError, InferenceError) as error:
                _refuse(request, error)
                continue
            try:
                if len(active.prompt) > _INLINE_PROMPT_CHARS:
                    self._tokenizer_thread.submit(self._admit, active)
                    continue
            except RuntimeError:
                pass  # finalized: _admit below answers it with the stopped engine's error
            self._admit(active)

    def _accept(self, request: InferenceRequest) -> _Active:
        """Parse and check what needs no tokenizer; the request then counts as waiting."""
        active = self._parse(request)
        with self._lock:
            if self._num_waiting >= self.max_waiting:
                raise InferenceError.unavailable(
                    f"Exceeds maximum queue size: {self._num_waiting} requests for model "
                    f"'{request.model_name}' are waiting (scheduler.max_waiting)"
                )
            self._num_waiting += 1
        return active

    def _admit(self, active: _Active) -> None:
        """Tokenize, check against the engine's limits and submit (any thread). Every failure is the
        request's answer: on the tokenizer thread an exception would vanish into an unread future."""
        request = active.request
        try:
            if request.responder.cancelled:
                raise InferenceError.cancelled("Request was cancelled")
            prompt: str | list[int] = active.prompt
            if not active.add_special_tokens and self.loop.tokenizer is not None:
                prompt = self.loop.tokenizer.encode(prompt, add_special_tokens=False)
            engine_request = self.loop.make_request(
                active.engine_id, prompt, active.params, engine_priority(request.priority)
            )
            with self._lock:
                self._active[active.engine_id] = active
            self.loop.submit(engine_request, functools.partial(self._on_output, active))
        except Exception as error:  # noqa: BLE001 - e.g. a stopped engine loop
            with self._lock:
                self._active.pop(active.engine_id, None)
            self._started(active)
            _refuse(request, error)

    def _started(self, active: _Active) -> None:
        if active.started:
            return
        with self._lock:
            if not active.started:
                active.started = True
                self._num_waiting -= 1

    def _on_output(self, active: _Active, output: RequestOutput) -> None:
        """On the engine's delivering thread: metrics per engine output (before any coalescing, so
        latencies are the engine's), then the response waits for the output thread."""
        self._started(active)
        new_tokens = sum(c.num_new_tokens for c in output.outputs)
        self.metrics.on_output(active.timer, new_tokens, output.num_prompt_tokens, output.finished)
        self._outputs.put((active, output))

    def _parse(self, request: InferenceRequest) -> _Active:
        from pagedserve.engine.sampling_params import SamplingParams

        inputs = request.inputs
        text = _scalar(inputs["text_input"])
        if len(text) > self.max_prompt_bytes:
            raise ValueError(
                f"the prompt has {len(text)} bytes; engine.max_prompt_bytes allows {self.max_prompt_bytes}"
            )
        prompt = text.decode("utf-8", errors="replace")
        stream = bool(_scalar(inputs["stream"])) if "stream" in inputs else False
        if "exclude_input_in_output" in inputs:
            exclude = bool(_scalar(inputs["exclude_input_in_output"]))
            if stream and not exclude:
                raise ValueError("When streaming, `exclude_input_in_output` = False is not allowed.")
        else:
            exclude = stream
        parameters = dict(request.parameters)
        # vLLM's name: false when the prompt already holds them (a rendered chat template adds BOS).
        add_special_tokens = parameters.pop("add_special_tokens", True)
        if not isinstance(add_special_tokens, bool):
            raise ValueError("request parameter 'add_special_tokens' must be a bool")
        if "sampling_parameters" in inputs:
            params = SamplingParams.from_json(_scalar(inputs["sampling_parameters"]).decode("utf-8"))
        else:
            params = SamplingParams.from_json_dict(parameters)
        wanted = {"text_output"} | {
            output
            for flag, output in _OPTIONAL_OUTPUTS.items()
            if flag in inputs and bool(_scalar(inputs[flag]))
        }
        if params.prompt_logprobs is not None:
            wanted.add("prompt_logprobs")
        wanted &= set(request.requested_outputs)
        if stream and params.num_seqs > params.n:
            raise ValueError("sampling parameter best_of > n cannot stream: the best n are known at the end")
        # Latencies count from the request's arrival at the server (monotonic clock in both).
        timer = RequestTimer(start=request.timing.arrival_ns / 1e9, n=params.n, max_tokens=params.max_tokens)
        active = _Active(request, uuid.uuid4().hex, prompt, stream, exclude, wanted, params, timer=timer)
        active.add_special_tokens = add_special_tokens
        return active

    # -- responses out (output thread) ------------------------------------------------------------

    def _output_thread(self) -> None:
        while True:
            try:
                # Held outputs are retried soon even if the engine goes quiet.
                first = self._outputs.get(timeout=0.005 if self._pacer.holding else 0.05)
                items = self._drain(first)
            except queue.Empty:
                items = []
            for active, output in self._pacer.pace(items):
                if active is None:
                    return
                try:
                    self._respond(active, output)
                except Exception as error:  # noqa: BLE001 - never leave a client waiting
                    log.exception("failed to build an LLM response")
                    if output.finished or not active.request.responder.cancelled:
                        response = InferenceResponse(
                            error=InferenceError.internal(_ERROR_PREFIX + str(error))
                        )
                        self._finish(active, response)
                        self.loop.abort(active.engine_id)
            self._abort_cancelled()

    def _drain(self, first: tuple[_Active, RequestOutput] | None) -> list[tuple[Any, Any]]:
        """``first`` and what is queued behind it (``None`` there stops the thread)."""
        items = [first]
        for _ in range(self._outputs.qsize()):  # bounded: the engine keeps adding meanwhile
            try:
                items.append(self._outputs.get_nowait())
            except queue.Empty:
                break
        return items

    def _abort_cancelled(self) -> None:
        with self._lock:
            cancelled = [a for a in self._active.values() if a.request.responder.cancelled and not a.aborted]
        for active in cancelled:
            active.aborted = True
            self.loop.abort(active.engine_id)

    def _respond(self, active: _Active, output: RequestOutput) -> None:
        if active.engine_id not in self._active:
            return  # already answered (an error ended it)
        if output.error is not None:
            error = InferenceError(_ERROR_PREFIX + output.error, grpc.StatusCode[output.error_code])
            self._finish(active, InferenceResponse(error=error))
        elif active.aborted or any(c.finish_reason == "abort" for c in output.outputs):
            self._finish(active, InferenceResponse(error=InferenceError.cancelled("Request was cancelled")))
        elif active.stream:
            response = self._response(active, output)
            if output.finished:
                self._finish(active, response)
            else:
                active.request.responder.send(response, final=False)
        elif output.finished:
            self._finish(active, self._response(active, output))

    def _finish(self, active: _Active, response: InferenceResponse) -> None:
        with self._lock:
            if self._active.pop(active.engine_id, None) is None:
                return
        active.request.responder.send(response, final=True)

    def _response(self, active: _Active, output: RequestOutput) -> InferenceResponse:
        completions = output.outputs
        outputs: dict[str, np.ndarray] = {}
        if active.stream:
            texts = [c.text_delta for c in completions]
        else:
            texts = [c.text if active.exclude_input else active.prompt + c.text for c in completions]
        outputs["text_output"] = _bytes_array(texts)
        if "finish_reason" in active.wanted:
            outputs["finish_reason"] = _bytes_array([str(c.finish_reason) for c in completions])
        if "cumulative_logprob" in active.wanted:
            outputs["cumulative_logprob"] = np.array([c.cumulative_logprob for c in completions], np.float32)
        if "logprobs" in active.wanted:
            outputs["logprobs"] = _bytes_array([self._logprobs_json(active, c) for c in completions])
        if "prompt_logprobs" in active.wanted and output.prompt_logprobs is not None:
            active.wanted.discard("prompt_logprobs")  # a stream gets them once, in its first response
            outputs["prompt_logprobs"] = _bytes_array([_prompt_logprobs_json(output, self.loop.tokenizer)])
        if "num_input_tokens" in active.wanted:
            outputs["num_input_tokens"] = np.array(output.num_prompt_tokens, dtype=np.uint32)
        if "num_output_tokens" in active.wanted:
            counts = [c.num_new_tokens if active.stream else len(c.token_ids) for c in completions]
            outputs["num_output_tokens"] = np.array(counts, dtype=np.uint32)
        return InferenceResponse(outputs=outputs)

    def _logprobs_json(self, active: _Active, completion: CompletionOutput) -> str:
        if active.params.logprobs is None or completion.logprobs is None:
            return "null"
        start = active.logprobs_sent.get(completion.index, 0) if active.stream else 0
        new = completion.logprobs[start:]
        active.logprobs_sent[completion.index] = len(completion.logprobs)
        tokenizer = self.loop.tokenizer
        entries = []
        for position, step in enumerate(new, start=start):
            ranks = {token: rank for rank, token in enumerate(sorted(step, key=lambda t: -step[t]), start=1)}
            # The sampled token comes first, as in vLLM's logprobs (clients such as the OpenAI
            # front-end read it from there), then the top alternatives by rank.
            sampled = completion.token_ids[position] if position < len(completion.token_ids) else None
            order = sorted(step, key=lambda t: (t != sampled, ranks[t]))
            entries.append(
                {
                    str(token): {
                        "logprob": step[token],
                        "rank": ranks[token],
                        "decoded_token": tokenizer.decode([token], skip_special_tokens=False)
                        if tokenizer
                        else "",
                    }
                    for token in order
                }
            )
        return json.dumps(entries)

    def chat_template(self) -> ChatTemplate | None:
        tokenizer = self.loop.tokenizer
        source = self.chat_template_override or (tokenizer.chat_template if tokenizer else None)
        if not source:
            return None
        return ChatTemplate(source, tokenizer.special_tokens if tokenizer else {})

    def engine_metrics(self) -> EngineMetricsSnapshot:
        """Read by the Prometheus collector at scrape time (see ``pagedserve.metrics``)."""
        stats = self.loop.stats()
        usage = stats.usage
        state = EngineState(
            num_running=stats.num_running,
            num_waiting=stats.num_waiting,
            kv_cache_usage=usage.usage,
            prefix_queried_tokens=usage.num_queried_tokens,
            prefix_hit_tokens=usage.num_hit_tokens,
            num_preemptions=stats.num_preemptions,
            engine_restarts=self.loop.restarts,
        )
        return self.metrics.snapshot(state)

    def replica_metrics(self) -> list[ReplicaState]:
        """Each data-parallel replica's state (none for a single engine); see pagedserve.replica_metrics."""
        from pagedserve.engine.replicas import ReplicaSet

        return self.loop.replica_states() if isinstance(self.loop, ReplicaSet) else []

    def failure(self) -> str | None:
        return self.loop.failure()

    def finalize(self) -> None:
        self._tokenizer_thread.shutdown()
        self.loop.stop()
        self._outputs.put(None)
        self._thread.join(5)


# Triton's request priority: 1 is the highest, larger numbers are lower, and 0 means "not set", the
# default level. The engine orders by ascending number, so "not set" goes after every explicit level.
_DEFAULT_PRIORITY = 2**31 - 1


def _may_wait(active: _Active, output: RequestOutput) -> bool:
    """A streamed piece that can wait for the client: not the last, and the previous one unwritten."""
    return (
        active.stream
        and not output.finished
        and output.error is None
        and not active.aborted
        and active.request.responder.unwritten > 0
    )


def engine_priority(triton_priority: int) -> int:
    return triton_priority if triton_priority > 0 else _DEFAULT_PRIORITY


def _refuse(request: InferenceRequest, error: Exception) -> None:
    """Answer a request the model will not run: a ValueError is the client's mistake."""
    if isinstance(error, ValueError):
        error = InferenceError(_ERROR_PREFIX + str(error))
    elif not isinstance(error, InferenceError):
        log.error("could not admit an LLM request", exc_info=error)
        error = InferenceError.internal(_ERROR_PREFIX + (str(error) or type(error).__name__))
    request.responder.send(InferenceResponse(error=error), True)


def _prompt_logprobs_json(output: RequestOutput, tokenizer: Tokenizer | None) -> str:
    """Each prompt token's entry as the ``logprobs`` output writes a generated token's: the actual
    token first, then the top ones by rank; the first prompt token's entry is null."""
    entries: list[dict[str, dict[str, Any]] | None] = []
    for token_id, step in zip(output.prompt_token_ids, output.prompt_logprobs or [], strict=False):
        if step is None:
            entries.append(None)
            continue
        ranks = {token: rank for rank, token in enumerate(sorted(step, key=lambda t: -step[t]), start=1)}
        entries.append(
            {
                str(token): {
                    "logprob": step[token],
                    "rank": ranks[token],
                    "decoded_token": (
                        tokenizer.decode([token], skip_special_tokens=False) if tokenizer else ""
                    ),
                }
                for token in sorted(step, key=lambda t: (t != token_id, ranks[t]))
            }
        )
    return json.dumps(entries)


def _scalar(array: np.ndarray) -> Any:
    flat = np.asarray(array).reshape(-1)
    if flat.size != 1:
        raise ValueError(f"expected one element, got {flat.size}")
    return flat[0]


def _bytes_array(texts: list[str]) -> np.ndarray:
    array = np.empty(len(texts), dtype=np.object_)
    array[:] = [t.encode("utf-8") for t in texts]
    return array


@hookimpl
def pagedserve_model_backends() -> list[type[ModelBackend]]:
    return [LLMBackend]


@hookimpl
def pagedserve_routing_policies() -> list[type[RoutingPolicy]]:
    from pagedserve_plugins.routing_policies import ROUTING_POLICIES

    return ROUTING_POLICIES
