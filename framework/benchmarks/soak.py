"""Soak and fuzz: abuse a real server and check that it answers every client with the right status,
never crashes, and gives back what the abuse took.

    python -m pagedserve.benchmarks.soak                  # the full run (minutes)
    python -m pagedserve.benchmarks.soak --scale 0.05     # the short run CI does (tests/test_soak.py)

Phases, each against one ``serve`` subprocess with every shipped model loaded (explicit model control,
client shared memory allowed, so every RPC has something to reach):

1. malformed: random bytes to every RPC of the service and to ModelStreamInfer, and well-formed
   requests with hostile contents (unknown models, wrong types and shapes, huge dims, bad sampling
   parameters, path-like names, deep JSON);
2. cancel: LLM streams cancelled after a random number of responses;
3. mixed: concurrent clients of mixed load (stock models, LLM streams, both at once) while the
   load/unload cycles run on one model;
4. drain: SIGTERM under load; the server must exit 0.

Between phases a probe measures a good request's latency; before and after, the server's (and its
engine processes') fds, threads and RSS, and the LLM's running/waiting requests and KV usage from
/metrics. Goal: no INTERNAL or UNKNOWN, no crash, resources back to the baseline.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import psutil

SERVICE = "inference.GRPCInferenceService"
LLM = "tiny-llama"
STOCK = ["simple", "simple_int8", "simple_identity", "simple_string", "repeat_int32", "simple_sequence",
         "simple_dyna_sequence", "identity_fp32", LLM]  # fmt: skip
RPCS = [
    "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer", "ModelConfig",
    "ModelStatistics", "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    "SystemSharedMemoryStatus", "SystemSharedMemoryRegister", "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus", "CudaSharedMemoryRegister", "CudaSharedMemoryUnregister", "TraceSetting",
    "LogSettings",
]  # fmt: skip
BAD_CODES = ("INTERNAL", "UNKNOWN")


# -- the server under test ----------------------------------------------------------------------------


@dataclass
class Server:
    process: subprocess.Popen[str]
    port: int
    metrics_port: int
    lines: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None


def start_server(extra: list[str]) -> Server:
    command = [sys.executable, "-m", "pagedserve", "server.host=127.0.0.1", "server.grpc_port=0",
               "frontends=[grpc]", "server.metrics_port=0", "model_control_mode=explicit",
               "server.allow_client_shm=true", "server.exit_timeout_s=30", f"model=[{','.join(STOCK)}]",
               *extra]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ports: dict[str, int] = {}
    found = threading.Event()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            for kind in ("GRPCInferenceService", "metrics"):
                match = re.search(rf"{kind} listening on [^:]+:(\d+)", line)
                if match:
                    ports[kind] = int(match.group(1))
            if len(ports) == 2:
                found.set()
        found.set()

    threading.Thread(target=pump, daemon=True).start()
    if not found.wait(300) or len(ports) < 2:
        process.kill()
        raise RuntimeError("server did not start:\n" + "".join(lines))
    server = Server(process, ports["GRPCInferenceService"], ports["metrics"], lines)
    _wait_ready(server)
    return server


def _wait_ready(server: Server) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.url)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if client.is_server_ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise RuntimeError("server never became ready:\n" + "".join(server.lines))


@dataclass(frozen=True)
class Resources:
    fds: int
    threads: int
    rss_mb: float
    llm_running: float
    llm_waiting: float
    kv_usage: float
    pending: float

    @classmethod
    def of(cls, server: Server) -> Resources:
        processes = [psutil.Process(server.process.pid)]
        processes += processes[0].children(recursive=True)
        fds = threads = rss = 0
        for p in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                fds, threads, rss = fds + p.num_fds(), threads + p.num_threads(), rss + p.memory_info().rss
        metrics = _scrape(server)
        return cls(
            fds, threads, rss / 2**20, metrics.get("vllm:num_requests_running", 0.0),
            metrics.get("vllm:num_requests_waiting", 0.0), metrics.get("vllm:kv_cache_usage_perc", 0.0),
            metrics.get("nv_inference_pending_request_count", 0.0),
        )  # fmt: skip


def _scrape(server: Server) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=30) as page:
        text = page.read().decode()
    totals: Counter[str] = Counter()
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            totals[name.split("{")[0]] += float(value)
    return dict(totals)


def settle(server: Server, timeout: float = 60) -> Resources:
    """Resources once the LLM has nothing running or waiting (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        resources = Resources.of(server)
        if (resources.llm_running + resources.llm_waiting + resources.pending == 0) or (
            time.monotonic() > deadline
        ):
            return resources
        time.sleep(0.5)


# -- status bookkeeping -------------------------------------------------------------------------------


class Tally:
    """Status codes by phase, and the calls that got a code no client mistake should get."""

    def __init__(self) -> None:
        self.codes: dict[str, Counter[str]] = {}
        self.bad: list[str] = []
        self._lock = threading.Lock()

    def add(self, phase: str, code: str, what: str = "") -> None:
        with self._lock:
            self.codes.setdefault(phase, Counter())[code] += 1
            if code in BAD_CODES and len(self.bad) < 20:
                self.bad.append(f"{phase}: {code} {what}")

    def bad_count(self) -> int:
        return sum(c[code] for c in self.codes.values() for code in BAD_CODES)


def call(channel: grpc.Channel, rpc: str, payload: bytes, timeout: float = 60) -> str:
    method = channel.unary_unary(f"/{SERVICE}/{rpc}")
    try:
        method(payload, timeout=timeout)
    except grpc.RpcError as error:
        return error.code().name  # type: ignore[union-attr]
    return "OK"


# -- request builders ---------------------------------------------------------------------------------


def _pb() -> Any:
    from tritonclient.grpc import service_pb2

    return service_pb2


def infer_request(model: str, rng: random.Random, hostile: bool) -> Any:
    """A ModelInferRequest for ``model``; ``hostile`` scrambles names, types, shapes and contents."""
    pb = _pb()
    request = pb.ModelInferRequest(model_name=model, id=str(rng.randrange(10**6)))
    if model == LLM:
        params = {"max_tokens": rng.randrange(1, 24), "temperature": rng.choice([0, 0.7])}
        payload = rng.choice(_HOSTILE_SAMPLING) if hostile else json.dumps(params)
        _bytes_input(request, "text_input", b"hello " * rng.randrange(1, 8))
        _bytes_input(request, "sampling_parameters", payload.encode())
        return request
    if model in ("simple_string",):
        for name in ("INPUT0", "INPUT1"):
            values = [str(rng.randrange(100)).encode() for _ in range(16)]
            if hostile:
                values[0] = rng.choice([b"99999999999999999999", b"abc", b"\xff\xfe", b"-" * 1000])
            _bytes_input(request, name, b"".join(len(v).to_bytes(4, "little") + v for v in values), [1, 16])
        return request
    dtype, names, shape = {
        "simple": ("INT32", ("INPUT0", "INPUT1"), [1, 16]),
        "simple_int8": ("INT8", ("INPUT0", "INPUT1"), [1, 16]),
        "simple_identity": ("BYTES", ("INPUT0",), [1, 1]),
        "identity_fp32": ("FP32", ("INPUT0",), [1, 16]),
        "repeat_int32": ("INT32", ("IN",), [2]),
        "simple_sequence": ("INT32", ("INPUT",), [1, 1]),
        "simple_dyna_sequence": ("INT32", ("INPUT",), [1, 1]),
    }.get(model, ("INT32", ("INPUT0",), [1, 16]))
    for name in names:
        tensor = request.inputs.add(name=name, datatype=dtype, shape=shape)
        if hostile:
            mutate = rng.randrange(6)
            if mutate == 0:
                tensor.shape[:] = [rng.choice([-1, 0, 2**40, 10**6])] * rng.randrange(1, 4)
            elif mutate == 1:
                tensor.datatype = rng.choice(["FP64", "BYTES", "BOGUS", ""])
            elif mutate == 2:
                tensor.name = rng.choice(["../../etc/passwd", "", "X" * 10_000])
            elif mutate == 3:
                tensor.parameters["shared_memory_region"].string_param = "nope"
            elif mutate == 4:
                tensor.contents.int_contents.extend(range(7))
                continue
        request.raw_input_contents.append(bytes(int(np.prod(shape)) * 4) if not hostile or rng.random() < 0.5
                                          else os.urandom(rng.randrange(0, 300)))  # fmt: skip
    if hostile and rng.random() < 0.3:
        request.parameters["sequence_id"].int64_param = rng.choice([-1, 2**62])
        request.parameters["priority"].int64_param = -5
    if model == "repeat_int32" and not hostile:
        request.inputs.add(name="DELAY", datatype="UINT32", shape=[2])
        request.inputs.add(name="WAIT", datatype="UINT32", shape=[1])
        request.raw_input_contents.extend([bytes(8), bytes(4)])
    return request


_HOSTILE_PARAMS = [
    {"n": 10**9}, {"n": -1}, {"seed": 2**64}, {"seed": -(2**63) - 1}, {"seed": 1e300}, {"max_tokens": -5},
    {"max_tokens": 10**12}, {"temperature": -1}, {"temperature": "hot"}, {"top_p": 7}, {"top_k": -9},
    {"stop_token_ids": [-1000000], "min_tokens": 3}, {"logprobs": 10**6}, {"best_of": 10**6},
    {"presence_penalty": 1e308}, {"frequency_penalty": float("nan")}, {"stop": ["x"] * 100_000},
    {"n": 2, "best_of": 1}, {"max_tokens": 1, "min_tokens": 5},
]  # fmt: skip
# Serialized sampling parameters, with JSON nested deeper than any parser's recursion limit.
_HOSTILE_SAMPLING = [json.dumps(p) for p in _HOSTILE_PARAMS] + ['{"a":' * 100_000 + "1" + "}" * 100_000]


def _bytes_input(request: Any, name: str, data: bytes, shape: list[int] | None = None) -> None:
    request.inputs.add(name=name, datatype="BYTES", shape=shape or [1])
    if shape is None:
        data = len(data).to_bytes(4, "little") + data
    request.raw_input_contents.append(data)


# -- phases ---------------------------------------------------------------------------------------------


def malformed(server: Server, tally: Tally, count: int, rng: random.Random) -> None:
    def one(i: int) -> None:
        with grpc.insecure_channel(server.url) as channel:
            kind = i % 4
            if kind == 0:
                rpc = rng.choice(RPCS)
                payload = os.urandom(rng.randrange(0, 2048))
                tally.add("malformed", call(channel, rpc, payload), f"{rpc} random bytes")
            elif kind == 1:
                model = rng.choice([*STOCK, "nope", "../../etc", "x" * 5000])
                rpc = rng.choice(["ModelMetadata", "ModelConfig", "ModelReady", "ModelStatistics"])
                message = {"ModelReady": "ModelReadyRequest", "ModelStatistics": "ModelStatisticsRequest",
                           "ModelConfig": "ModelConfigRequest"}.get(rpc, "ModelMetadataRequest")  # fmt: skip
                request = getattr(_pb(), message)(name=model, version=rng.choice(["", "1", "-3", "x"]))
                tally.add("malformed", call(channel, rpc, request.SerializeToString()), f"{rpc} {model[:20]}")
            elif kind == 2:
                model = rng.choice(STOCK)
                request = infer_request(model, rng, hostile=True)
                tally.add("malformed", call(channel, "ModelInfer", request.SerializeToString()), model)
            else:
                _stream_garbage(channel, tally, rng)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))


def _stream_garbage(channel: grpc.Channel, tally: Tally, rng: random.Random) -> None:
    stream = channel.stream_stream(f"/{SERVICE}/ModelStreamInfer")
    good = infer_request("simple", rng, hostile=False).SerializeToString()
    messages = [os.urandom(rng.randrange(1, 512)), good, infer_request(LLM, rng, True).SerializeToString()]
    try:
        responses = list(stream(iter(messages), timeout=120))
        pb = _pb()
        for raw in responses:
            response = pb.ModelStreamInferResponse.FromString(raw)
            text = response.error_message
            code = "INTERNAL" if ("Traceback" in text or "Error(" in text) else ("ERROR" if text else "OK")
            tally.add("malformed-stream", code, text[:80])
    except grpc.RpcError as error:
        tally.add("malformed-stream", error.code().name, "stream")  # type: ignore[union-attr]


def cancel_streams(server: Server, tally: Tally, count: int, rng: random.Random) -> None:
    def one(i: int) -> None:
        with grpc.insecure_channel(server.url) as channel:
            stream = channel.stream_stream(f"/{SERVICE}/ModelStreamInfer")
            request = infer_request(LLM, random.Random(i), hostile=False)
            request.inputs.add(name="stream", datatype="BOOL", shape=[1])
            request.raw_input_contents.append(b"\x01")
            params = {"max_tokens": 64, "ignore_eos": True, "temperature": 0}
            request.raw_input_contents[1] = _length_prefixed(json.dumps(params).encode())
            call_ = stream(iter([request.SerializeToString()]), timeout=120)
            stop_after = rng.randrange(0, 8)
            try:
                for seen, _ in enumerate(call_):
                    if seen >= stop_after:
                        break
                call_.cancel()
                tally.add("cancel", "CANCELLED")
            except grpc.RpcError as error:
                tally.add("cancel", error.code().name, "stream")  # type: ignore[union-attr]

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(count)))


def _length_prefixed(data: bytes) -> bytes:
    return len(data).to_bytes(4, "little") + data


def mixed_load(server: Server, tally: Tally, seconds: float, clients: int, cycles: int) -> list[float]:
    """``clients`` threads of mixed requests while ``cycles`` unload/load cycles of one model run;
    returns the latencies (ms) of a probe's good ``simple`` requests meanwhile."""
    stop = threading.Event()
    latencies: list[float] = []

    def worker(i: int) -> None:
        rng = random.Random(i)
        with grpc.insecure_channel(server.url) as channel:
            while not stop.is_set():
                model = rng.choice(["simple", "identity_fp32", LLM, "simple_string", "simple_int8"])
                request = infer_request(model, rng, hostile=rng.random() < 0.2)
                if model == LLM:
                    code = _stream_once(channel, request)
                else:
                    code = call(channel, "ModelInfer", request.SerializeToString())
                tally.add("mixed", code, model)

    def probe() -> None:
        rng = random.Random(-1)
        with grpc.insecure_channel(server.url) as channel:
            while not stop.is_set():
                payload = infer_request("simple", rng, hostile=False).SerializeToString()
                started = time.perf_counter()
                code = call(channel, "ModelInfer", payload)
                if code == "OK":
                    latencies.append((time.perf_counter() - started) * 1000)
                tally.add("probe", code, "simple")
                time.sleep(0.05)

    def cycle() -> None:
        pb = _pb()
        with grpc.insecure_channel(server.url) as channel:
            for _ in range(cycles):
                unload = pb.RepositoryModelUnloadRequest(model_name="identity_fp32").SerializeToString()
                tally.add("load-cycle", call(channel, "RepositoryModelUnload", unload))
                load = pb.RepositoryModelLoadRequest(model_name="identity_fp32").SerializeToString()
                tally.add("load-cycle", call(channel, "RepositoryModelLoad", load))

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    threads += [threading.Thread(target=probe), threading.Thread(target=cycle)]
    for thread in threads:
        thread.start()
    threads[-1].join()  # the cycles take as long as they take; the load runs at least ``seconds``
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.2)
    stop.set()
    for thread in threads:
        thread.join()
    return latencies


def _stream_once(channel: grpc.Channel, request: Any) -> str:
    stream = channel.stream_stream(f"/{SERVICE}/ModelStreamInfer")
    try:
        pb = _pb()
        for raw in stream(iter([request.SerializeToString()]), timeout=120):
            text = pb.ModelStreamInferResponse.FromString(raw).error_message
            if "Traceback" in text or "engine step failed" in text:
                return "INTERNAL"
            if text:
                return "ERROR"
    except grpc.RpcError as error:
        return error.code().name  # type: ignore[union-attr]
    return "OK"


def drain_under_load(server: Server, tally: Tally) -> tuple[int | None, float]:
    """SIGTERM while clients send; the exit code and how long the exit took."""
    stop = threading.Event()

    def worker(i: int) -> None:
        rng = random.Random(1000 + i)
        with grpc.insecure_channel(server.url) as channel:
            while not stop.is_set() and server.alive():
                payload = infer_request("simple", rng, False).SerializeToString()
                code = call(channel, "ModelInfer", payload, 10)
                tally.add("drain", code)
                if code != "OK":
                    time.sleep(0.05)  # refused while draining: a client would back off too

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    try:
        code = server.process.wait(90)
    except subprocess.TimeoutExpired:
        server.process.kill()
        code = None
    took = time.monotonic() - started
    stop.set()
    for thread in threads:
        thread.join()
    return code, took


# -- the run --------------------------------------------------------------------------------------------


@dataclass
class Report:
    tally: Tally
    before: Resources
    after: Resources
    probe_idle_ms: list[float]
    probe_abuse_ms: list[float]
    crashes: int
    exit_code: int | None
    exit_s: float

    def ok(self) -> bool:
        return (
            self.tally.bad_count() == 0
            and self.crashes == 0
            and self.exit_code == 0
            and self.after.llm_running + self.after.llm_waiting + self.after.pending == 0
            and self.after.kv_usage <= self.before.kv_usage
            and self.after.fds <= self.before.fds + 16
            and self.after.threads <= self.before.threads + 16
        )

    def render(self) -> str:
        lines = ["| phase | " + " | ".join(_CODE_ORDER) + " | other |", "|---" * (len(_CODE_ORDER) + 2) + "|"]
        for phase, codes in self.tally.codes.items():
            other = sum(v for k, v in codes.items() if k not in _CODE_ORDER)
            lines.append(
                f"| {phase} | " + " | ".join(str(codes.get(c, 0)) for c in _CODE_ORDER) + f" | {other} |"
            )
        lines += [
            "",
            f"INTERNAL/UNKNOWN: {self.tally.bad_count()} (goal 0); crashes: {self.crashes} (goal 0); exit "
            f"after SIGTERM under load: code {self.exit_code} in {self.exit_s:.1f} s",
            "",
        ]
        lines += ["| resource | before | after |", "|---|---:|---:|"]
        for name in ("fds", "threads", "rss_mb", "llm_running", "llm_waiting", "kv_usage", "pending"):
            lines.append(f"| {name} | {getattr(self.before, name):.4g} | {getattr(self.after, name):.4g} |")
        lines += ["", "| good `simple` request | p50 ms | p99 ms | n |", "|---|---:|---:|---:|"]
        for label, values in (("idle", self.probe_idle_ms), ("during abuse", self.probe_abuse_ms)):
            lines.append(f"| {label} | {_pct(values, 50):.1f} | {_pct(values, 99):.1f} | {len(values)} |")
        if self.tally.bad:
            lines += ["", "first bad answers:", *(f"- {b}" for b in self.tally.bad)]
        return "\n".join(lines)


_CODE_ORDER = ["OK", "ERROR", "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", "RESOURCE_EXHAUSTED",
               "CANCELLED", "UNIMPLEMENTED", "DEADLINE_EXCEEDED", "INTERNAL", "UNKNOWN"]  # fmt: skip


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


def _idle_probe(server: Server, n: int) -> list[float]:
    rng = random.Random(7)
    latencies = []
    with grpc.insecure_channel(server.url) as channel:
        for _ in range(n):
            payload = infer_request("simple", rng, hostile=False).SerializeToString()
            started = time.perf_counter()
            if call(channel, "ModelInfer", payload) == "OK":
                latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def run(scale: float, seconds: float, extra: list[str], log: Callable[[str], None] = print) -> Report:
    rng = random.Random(0)
    server = start_server(extra)
    tally = Tally()
    try:
        idle = _idle_probe(server, 50)
        before = settle(server)
        log(f"baseline: {before}")
        malformed(server, tally, max(40, int(10_000 * scale)), rng)
        log(f"malformed done: {dict(tally.codes.get('malformed', {}))}")
        cancel_streams(server, tally, max(20, int(1_000 * scale)), rng)
        log("cancel done")
        abuse = mixed_load(
            server, tally, seconds, clients=64 if scale >= 0.5 else 16, cycles=max(5, int(50 * scale))
        )
        log("mixed load done")
        crashes = _crashes(server)
        after = settle(server)
        log(f"after: {after}")
        exit_code, exit_s = drain_under_load(server, tally)
    finally:
        if server.alive():
            server.process.kill()
    return Report(tally, before, after, idle, abuse, crashes, exit_code, exit_s)


def _crashes(server: Server) -> int:
    died = 0 if server.alive() else 1
    output = "".join(server.lines)
    return died + output.count("exited unexpectedly") + output.count("Segmentation fault")


def main(argv: Iterator[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="share of the full request counts")
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the mixed load runs at least")
    parser.add_argument("--out", default="", help="also write the report (markdown) here")
    parser.add_argument("overrides", nargs="*", help="extra serve overrides")
    args = parser.parse_args(list(argv) if argv is not None else None)
    started = time.monotonic()
    report = run(args.scale, args.seconds, args.overrides, log=lambda m: print(m, file=sys.stderr))
    text = report.render() + f"\n\nwall time: {time.monotonic() - started:.0f} s; scale {args.scale}\n"
    print(text)
    if args.out:
        with open(args.out, "w") as out:
            out.write(text)
    return 0 if report.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
