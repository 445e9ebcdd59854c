"""One GPU-machine call: GPU tests, the offline benchmark beside the HF peers, a sweep, a step profile.

    python3 framework/benchmarks/device_run.py --out "$OUT" --steps tests,bench,peers,profile

Works from a bare checkout (no ``pip install``): a shim directory makes ``pagedserve`` and
``pagedserve_plugins`` importable, lists the plugins that import on this machine as entry points
(one that fails to import, e.g. for a missing optional package, is left out and reported), and puts
a ``bench`` command on ``PATH``, so the steps run the same commands as a developer machine. Each step
is a subprocess with its own time limit (and all of them share ``--deadline``); its output goes to
``OUT/<step>.log``. At the end the benchmark tables are printed again, verbatim.

Steps (``--bench-extra`` is appended to every ``bench`` command):

* ``tests``: ``pytest -m gpu`` over ``tests/`` (engine parity with transformers on the GPU, CUDA
  graphs, Triton kernels, fused layers), in parallel workers.
* ``bench``: the standard workload (512 requests) on our engine alone; ``bench256``, ``bench512`` and
  ``bench16k`` the same with ``scheduler.max_num_seqs=256`` / ``512`` or
  ``scheduler.max_num_batched_tokens=16384``; ``benchfp8`` with the FP8 KV cache (``cache.dtype=fp8``),
  ``benchw8`` with float8 linear weights (``engine.quantization=fp8``), ``benchw8kv8`` with both.
* ``peers``: the first ``--peer-requests`` requests of the same workload on our engine and both HF
  peers, in one ``bench`` run (the peers need minutes for all 512).
* ``sweep``: ``bench -m cache.block_size=16,32,64 scheduler=fcfs,priority`` without peers.
* ``profile``: the standard workload again in-process (``max_num_seqs=512``), timing every step by
  kind (decode-only or with prefill) and the host's share of it, and the device time by kernel
  category in two windows of steps (prefill, decode).
* ``profilew8``: the same with float8 weights and KV cache, and a third window late in the run.
* ``ablation``: 256 requests with each of async scheduling, CUDA graphs and the fused kernels off.
* ``fusions``: eager PyTorch vs the Triton kernels vs ``torch.compile`` for the fused ops.
* ``serving``: the serving benchmark (``pagedserve.benchmarks.serving``) on llama3 with random
  weights, 512 requests at each of ``--serving-rates`` (default 16, 64 req/s and all at once), then
  the offline engine on the last saturation run's prompts.
* ``frontends``: streaming output tok/s at saturation through gRPC, the OpenAI chat stream and HTTP
  ``generate_stream`` of one server (``pagedserve.benchmarks.frontend_streams``), llama3 with random
  weights, 512 requests a pass.
* ``moe``: Qwen3-30B-A3B's shape with random weights, our engine beside HF ``generate``
  (``pagedserve.benchmarks.moe``).
* ``structured``: the engine with and without a JSON schema (``pagedserve.benchmarks.structured_output``).
* ``attention_tests``: only the GPU tests of the Triton kernels and the KV cache dtypes.
* ``decode_bench``: the paged decode (and prefill) kernel beside SDPA (``device_check.py``).
* ``fp8_decode``: the decode kernel on bf16 vs float8 caches, with a launch-parameter sweep.
* ``decode_ncu``: Nsight Compute counters of the decode kernel on a bf16 and a float8 cache.
* ``overlap``: one layer's matmuls and decode attention, sequential vs on two streams.
* ``prefill_sweep``: prefill launch parameters swept on the workload's prompt mix, bf16 and float8 caches.
* ``decode_gemm``: one layer's linears at decode and prefill batch sizes (cuBLAS, cuBLASLt, float8
  weights) beside their roofline.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import subprocess
import sys
import tempfile
import time
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LIMIT = "bench.limit_output_tokens_per_s=18500"
BENCH = f"bench model=llama3 engine.load_format=dummy kernel=triton {LIMIT}"
# entry-point name -> module, as pyproject declares them (no install on the device machine)
PLUGINS: dict[str, str] = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["entry-points"][
    "pagedserve.plugins"
]


def steps(
    peer_requests: int,
    extra: str,
    workers: int,
    out: Path,
    bench: str = BENCH,
    serving_rates: str = "16 64 inf",
) -> dict[str, tuple[str, int]]:
    """name -> (shell command, time limit in seconds)."""
    here = shlex.quote(sys.executable)
    serve_args = "engine.load_format=dummy kernel=triton " + extra
    me = f"{here} {shlex.quote(__file__)}"
    return {
        "tests": (
            f"{here} -m pytest -m gpu -q -rfE -p no:cacheprovider --continue-on-collection-errors "
            f"-n {workers} tests",
            200,
        ),
        "attention_tests": (
            f"{here} -m pytest -m gpu -q -rfE -p no:cacheprovider -n {workers} "
            "tests/test_triton_attention.py tests/test_engine_kv_cache_dtype.py",
            150,
        ),
        "decode_bench": (
            f"{here} framework/benchmarks/kernels/device_check.py --out {shlex.quote(str(out / 'decode'))} "
            "--no-tests --no-sweep",
            240,
        ),
        "fp8_decode": (
            f"{here} framework/benchmarks/kernels/fp8_decode_check.py "
            f"--out {shlex.quote(str(out / 'fp8_decode'))}",
            240,
        ),
        "decode_ncu": (
            f"{here} framework/benchmarks/kernels/decode_ncu_check.py --out {shlex.quote(str(out / 'ncu'))}",
            120,
        ),
        "overlap": (
            f"{here} framework/benchmarks/kernels/overlap_check.py --out {shlex.quote(str(out / 'overlap'))}",
            180,
        ),
        "prefill_sweep": (
            f"{here} framework/benchmarks/kernels/prefill_sweep_check.py "
            f"--out {shlex.quote(str(out / 'prefill_sweep'))}",
            300,
        ),
        "decode_gemm": (
            f"{here} framework/benchmarks/kernels/decode_gemm_check.py "
            f"--out {shlex.quote(str(out / 'gemm'))}",
            180,
        ),
        "bench": (f"{bench} bench.num_requests=512 bench.peers=[] {extra}", 240),
        "benchfp8": (f"{bench} bench.num_requests=512 bench.peers=[] cache.dtype=fp8 {extra}", 240),
        "benchw8": (
            f"{bench} bench.num_requests=512 bench.peers=[] engine.quantization=fp8 {extra}",
            240,
        ),
        "benchw8kv8": (
            f"{bench} bench.num_requests=512 bench.peers=[] engine.quantization=fp8 cache.dtype=fp8 {extra}",
            240,
        ),
        "bench512": (
            f"{bench} bench.num_requests=512 bench.peers=[] scheduler.max_num_seqs=512 {extra}",
            240,
        ),
        "bench16k": (
            f"{bench} bench.num_requests=512 bench.peers=[] scheduler.max_num_batched_tokens=16384 {extra}",
            240,
        ),
        "bench256": (
            f"{bench} bench.num_requests=512 bench.peers=[] scheduler.max_num_seqs=256 {extra}",
            240,
        ),
        "peers": (f"{bench} bench.num_requests={peer_requests} {extra}", 420),
        "sweep": (
            f"{bench.replace('bench ', 'bench -m ', 1)} bench.num_requests=512 bench.peers=[] {extra} "
            "cache.block_size=16,32,64 scheduler=fcfs,priority",
            500,
        ),
        "profile": (f"{me} --profile-child --max-num-seqs 512 --windows 2:8,100:120", 240),
        "profilew8": (
            f"{me} --profile-child --variant w8kv8 --max-num-seqs 512 --windows 2:8,100:120,400:420",
            240,
        ),
        "ablation": (
            " ; ".join(
                f"{me} --profile-child --variant {v} --requests 256 --max-num-seqs 512 --windows ''"
                for v in VARIANTS
            ),
            300,
        ),
        "fusions": (f"{me} --fusion-bench", 240),
        "frontends": (
            f"{here} -m pagedserve.benchmarks.frontend_streams --model llama3 --num-requests 512 "
            f"--rounds 3 --serve-args {serve_args}",
            300,
        ),
        "moe": (f"{here} -m pagedserve.benchmarks.moe --shape qwen3-30b-a3b --num-requests 256", 300),
        "structured": (
            f"{here} -m pagedserve.benchmarks.structured_output throughput --device cuda --num-requests 256",
            150,
        ),
        "serving": (
            f"{here} -m pagedserve.benchmarks.serving --model llama3 --num-requests 512 "
            f"--rates {serving_rates} "
            f"--json {shlex.quote(str(out / 'serving.json'))} --markdown --serve-args {serve_args}",
            420,
        ),
    }


# ---------------------------------------------------------------------------------------------- set-up


def make_shim() -> tuple[Path, list[str]]:
    """A directory that imports like an installed pagedserve; returns it and the plugins left out."""
    shim = Path(tempfile.mkdtemp(prefix="pagedserve_shim_"))
    package = shim / "pagedserve"
    package.mkdir()
    for item in (REPO / "framework").iterdir():
        (package / item.name).symlink_to(item)
    (package / "conf").symlink_to(REPO / "conf")  # pyproject maps pagedserve.conf onto conf/
    (shim / "pagedserve_plugins").symlink_to(REPO / "plugins")
    sys.path.insert(0, str(shim))
    left_out, entry_points = [], ["[pagedserve.plugins]"]
    for name, module in PLUGINS.items():
        try:
            importlib.import_module(module)
        except Exception as error:  # noqa: BLE001 - report and go on without it
            left_out.append(f"{name} ({type(error).__name__}: {error})")
            continue
        entry_points.append(f"{name} = {module}")
    info = shim / "pagedserve-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: pagedserve\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("\n".join(entry_points) + "\n")
    bin_dir = shim / "bin"
    bin_dir.mkdir()
    script = bin_dir / "bench"
    script.write_text(
        f"#!{sys.executable}\nimport sys\nfrom pagedserve.cli import bench\nsys.exit(bench())\n"
    )
    script.chmod(0o755)
    return shim, left_out


def environment_report() -> str:
    import torch

    lines = [f"python {sys.version.split()[0]}, torch {torch.__version__}"]
    for name in ("triton", "transformers", "hydra", "grpc", "google.protobuf"):
        try:
            lines.append(f"{name} {importlib.import_module(name).__version__}")
        except Exception as error:  # noqa: BLE001
            lines.append(f"{name}: {error}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        memory = props.total_memory / 2**30
        lines.append(f"{props.name}, {props.multi_processor_count} SMs, {memory:.0f} GiB")
    return "; ".join(lines)


# ---------------------------------------------------------------------------------------------- steps


def run_step(name: str, command: str, limit: float, out: Path, env: dict[str, str]) -> tuple[int, float]:
    print(f"\n=== {name} (limit {limit:.0f} s): {command}", flush=True)
    start = time.time()
    with (out / f"{name}.log").open("w") as log:
        log.write(f"$ {command}\n")
        log.flush()
        try:
            proc = subprocess.run(
                command,
                shell=True,
                cwd=REPO,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=limit,
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = 124
            log.write(f"\n[device_run] step '{name}' stopped at its {limit:.0f} s limit\n")
    seconds = time.time() - start
    print(f"=== {name}: rc={rc} in {seconds:.0f} s", flush=True)
    return rc, seconds


_LOG_MARKERS = (
    "pagedserve: ",
    "serving at saturation",
    "rate ",
    "engine freed",
    "row is left out",
    "produced no tokens",
    "OutOfMemoryError",
)


def tables(text: str) -> str:
    """Every rich table in a log (title line to bottom border), plus the tests' summary lines."""
    lines, keep, grabbing = text.splitlines(), [], False
    for line in lines:
        if "Offline throughput" in line or line.startswith(("FAILED", "ERROR")):
            grabbing = "Offline throughput" in line
            keep.append(line)
            continue
        if grabbing:
            keep.append(line)
            if line.startswith("└"):
                grabbing = False
        elif any(marker in line for marker in _LOG_MARKERS):
            keep.append(line.strip())
        elif line.startswith(("=", "|", "[profile]", "[fusion]")) or " passed" in line or " failed" in line:
            keep.append(line)
    return "\n".join(keep)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "device_out")))
    parser.add_argument("--steps", default="tests,bench,peers,profile")
    parser.add_argument("--peer-requests", type=int, default=64)
    parser.add_argument("--bench-extra", default="")
    parser.add_argument("--bench", default=BENCH, help="the bench command and its fixed overrides")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--serving-rates", default="16 64 inf", help="request rates of the serving step")
    parser.add_argument("--deadline", type=float, default=560.0, help="seconds for all steps together")
    args = parser.parse_args(argv)
    start = time.time()
    args.out.mkdir(parents=True, exist_ok=True)
    shim, left_out = make_shim()
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), env.get("PYTHONPATH")]))
    env["PATH"] = f"{shim / 'bin'}{os.pathsep}{env['PATH']}"
    env.update(PYTHONUNBUFFERED="1", COLUMNS="200", PAGEDSERVE_BENCH_EXTRA=args.bench_extra)
    report = environment_report()
    print(report)
    if left_out:
        print("plugins left out here: " + "; ".join(left_out))
    table = steps(
        args.peer_requests, args.bench_extra, args.workers, args.out, args.bench, args.serving_rates
    )
    results = []
    for name in [s for s in args.steps.split(",") if s]:
        command, limit = table[name]
        remaining = args.deadline - (time.time() - start)
        if remaining < 30:
            print(f"=== {name}: skipped, {remaining:.0f} s left of the deadline")
            results.append((name, "skipped", 0.0))
            continue
        rc, seconds = run_step(name, command, min(limit, remaining - 10), args.out, env)
        results.append((name, rc, seconds))
    summary = [f"# device run ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())})", report]
    for name, rc, seconds in results:
        summary.append(f"\n## {name}: rc={rc}, {seconds:.0f} s\n$ {table[name][0]}")
        log = args.out / f"{name}.log"
        if log.exists():
            summary.append(tables(log.read_text(errors="replace")))
    text = "\n".join(summary)
    (args.out / "summary.md").write_text(text + "\n")
    print("\n" + text)
    return 0 if all(rc == 0 for _, rc, _ in results) else 1


# ---------------------------------------------------------------------------------------------- profile

VARIANTS = {  # name -> EngineConfig overrides (``fused=False``: PAGEDSERVE_FUSED=0; ``cache``: KV dtype)
    "default": {},
    "no-overlap": {"async_scheduling": False},
    "no-graphs": {"cuda_graphs": False},
    "no-fusion": {"fused": False},
    "w8kv8": {"quantization": "fp8", "cache": "fp8"},  # float8 weights and KV cache
}
CATEGORIES = (  # kernel-name fragments -> category, first match wins
    ("decode_", "attention decode"),
    ("prefill_kernel", "attention prefill"),
    ("store_kv", "kv store"),
    ("_rms_norm", "rmsnorm+residual"),
    ("_silu", "silu*mul"),
    ("_rotary", "rotary"),
    ("_quantize_rows", "fp8 quantize"),
    ("nvjet", "matmul"),
    ("gemm", "matmul"),
    ("cutlass", "matmul"),
)


def _kernel_table(profiler, wall: float, label: str) -> None:  # noqa: ANN001
    totals: dict[str, float] = {}
    for event in profiler.key_averages():
        micros = getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0)
        if not micros:
            continue
        category = next((c for frag, c in CATEGORIES if frag in event.key), "other")
        totals[category] = totals.get(category, 0.0) + micros / 1e6
    busy = sum(totals.values())
    print(f"[profile] {label}: {wall * 1000:.0f} ms wall, device busy {100 * busy / wall:.0f}%")
    for category, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"[profile]   {category:18s} {seconds * 1000:8.1f} ms  {100 * seconds / busy:5.1f}%")


def profile_child(argv: list[str]) -> int:
    """The standard workload in-process: step times by kind, the host's share, profiler windows."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--variant", default="default", choices=sorted(VARIANTS))
    parser.add_argument("--requests", type=int, default=512)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--windows", default="2:8,100:120", help="step ranges to profile, or ''")
    args = parser.parse_args(argv)
    overrides = dict(VARIANTS[args.variant])
    if not overrides.pop("fused", True):
        os.environ["PAGEDSERVE_FUSED"] = "0"

    import torch
    from pagedserve.benchmarks.workload import standard_workload
    from pagedserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from pagedserve.engine.llm_engine import LLMEngine
    from pagedserve.engine.sampling_params import SamplingParams

    scheduler = SchedulerConfig(
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens
    )
    started = time.time()
    cache = CacheConfig(dtype=overrides.pop("cache", "auto"))
    config = EngineConfig(
        model="llama3-8b", load_format="dummy", kernel="triton", scheduler=scheduler, cache=cache, **overrides
    )
    engine = LLMEngine(config)
    label = f"{args.variant}, {args.requests} requests, max_num_seqs={args.max_num_seqs}"
    print(f"[profile] {label}: engine ready in {time.time() - started:.1f} s ({engine.attention_backend})")
    warm = standard_workload(64, 128256, (64, 1024), (2, 6), seed=1)
    for i, r in enumerate(warm):
        params = SamplingParams(max_tokens=r.output_len, ignore_eos=True)
        engine.add_request(f"w{i}", r.prompt_token_ids, params)
    while engine.has_unfinished_requests():
        engine.step()
    requests = standard_workload(args.requests)
    for i, r in enumerate(requests):
        params = SamplingParams(temperature=0.0, max_tokens=r.output_len, ignore_eos=True)
        engine.add_request(f"r{i}", r.prompt_token_ids, params)

    kinds: list[str] = []
    schedule = engine.scheduler.schedule

    def recording_schedule():  # noqa: ANN202
        batch = schedule()
        decode_only = all(n == 1 for n in batch.num_new_tokens)
        kinds.append("empty" if batch.is_empty else "decode" if decode_only else "mixed")
        return batch

    waited = [0.0]
    collect = engine.runner.collect

    def timed_collect(handle):  # noqa: ANN001, ANN202
        t0 = time.perf_counter()
        result = collect(handle)
        waited[0] += time.perf_counter() - t0
        return result

    engine.scheduler.schedule = recording_schedule
    engine.runner.collect = timed_collect
    windows = [tuple(map(int, w.split(":"))) for w in args.windows.split(",") if w]
    times: list[tuple[float, float]] = []  # per step() call: wall seconds, of which waiting
    torch.cuda.synchronize()
    t_start = time.perf_counter()
    profiler, window_start = None, 0.0
    while engine.has_unfinished_requests():
        for first, _ in windows:
            if len(times) == first:
                torch.cuda.synchronize()
                profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA])
                profiler.__enter__()
                window_start = time.perf_counter()
        before = waited[0]
        t0 = time.perf_counter()
        engine.step()
        times.append((time.perf_counter() - t0, waited[0] - before))
        for first, last in windows:
            if profiler is not None and len(times) == last:
                torch.cuda.synchronize()
                wall = time.perf_counter() - window_start
                profiler.__exit__(None, None, None)
                _kernel_table(profiler, wall, f"steps {first}-{last - 1} ({kinds[first]}...)")
                profiler = None
    torch.cuda.synchronize()
    total = time.perf_counter() - t_start
    output_tokens = sum(r.output_len for r in requests)
    print(
        f"[profile] {label}: {len(times)} steps, {total:.2f} s, {output_tokens / total:,.0f} output tok/s"
        + (" (profiled windows included)" if windows else "")
    )
    # With overlap, step() call i+1 launches batch i+1 and then waits for batch i: charge it to i.
    shift = 1 if engine.overlap else 0
    charged = list(zip(kinds, times[shift:], strict=False))
    for kind in ("decode", "mixed"):
        rows = [t for k, t in charged if k == kind]
        if rows:
            wall = sum(t[0] for t in rows)
            wait = sum(t[1] for t in rows)
            print(
                f"[profile]   {kind:6s}: {len(rows):4d} steps, {wall:6.2f} s, "
                f"{1000 * wall / len(rows):6.2f} ms/step, host busy {100 * (wall - wait) / wall:5.1f}%"
            )
    return 0


def fusion_bench() -> int:
    """Eager PyTorch vs the Triton kernels vs ``torch.compile`` for the three fused ops (bf16)."""
    import functools

    import torch
    import torch.nn.functional as F
    import triton
    from pagedserve.models.layers import fused

    def rms_eager(x, residual, weight):  # noqa: ANN001, ANN202
        s = x + residual
        s32 = s.float()
        return weight * (s32 * torch.rsqrt(s32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(s.dtype), s

    def rms_kernel(x, residual, weight):  # noqa: ANN001, ANN202
        return fused.rms_norm(x, weight, 1e-5, residual)

    def silu_eager(x):  # noqa: ANN001, ANN202
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary_eager(positions, q, k, cos, sin):  # noqa: ANN001, ANN202
        c, s = cos[positions][:, None, :], sin[positions][:, None, :]
        out = []
        for x in (q, k):
            x1, x2 = x.float().chunk(2, dim=-1)
            out.append(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype))
        return out

    def median_us(fn, inputs):  # noqa: ANN001, ANN202
        return 1000 * triton.testing.do_bench(functools.partial(fn, *inputs), return_mode="median")

    print("[fusion] op, tokens: eager / triton / torch.compile, us (median); compile seconds")
    dev, bf16 = "cuda", torch.bfloat16
    for tokens in (256, 8192):
        x = torch.randn(tokens, 4096, device=dev, dtype=bf16)
        qkv = torch.randn(tokens, 6144, device=dev, dtype=bf16)
        rotary_args = (
            torch.randint(0, 8192, (tokens,), device=dev, dtype=torch.int32),
            qkv[:, :4096].view(tokens, 32, 128),
            qkv[:, 4096:5120].view(tokens, 8, 128),
            torch.randn(8192, 64, device=dev),
            torch.randn(8192, 64, device=dev),
        )
        gate_up = torch.randn(tokens, 28672, device=dev, dtype=bf16)
        cases = [
            ("rmsnorm+residual", rms_eager, rms_kernel, (x, torch.randn_like(x), torch.randn_like(x[0]))),
            ("silu*mul", silu_eager, fused.silu_and_mul, (gate_up,)),
            ("rotary", rotary_eager, fused.rotary_, rotary_args),
        ]
        for name, eager, kernel, inputs in cases:
            compiled = torch.compile(eager, dynamic=False)
            t0 = time.time()
            try:
                compiled(*inputs)
                torch.cuda.synchronize()
                compile_s = time.time() - t0
                t_compiled = median_us(compiled, inputs)
            except Exception as error:  # noqa: BLE001 - report and go on
                compile_s, t_compiled = time.time() - t0, float("nan")
                print(f"[fusion] torch.compile failed for {name}: {type(error).__name__}: {error}")
            t_eager, t_kernel = median_us(eager, inputs), median_us(kernel, inputs)
            print(
                f"[fusion] {name:16s} {tokens:5d}: {t_eager:8.1f} / {t_kernel:8.1f} / {t_compiled:8.1f}"
                f"   ({compile_s:.0f} s)"
            )
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--profile-child"]:
        sys.exit(profile_child(sys.argv[2:]))
    if sys.argv[1:2] == ["--fusion-bench"]:
        sys.exit(fusion_bench())
    sys.exit(main())
