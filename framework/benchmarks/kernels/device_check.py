"""One-call GPU check of the Triton paged-attention kernels: correctness tests, then the decode benchmark.

    python3 framework/benchmarks/kernels/device_check.py --out "$OUT"          # tests + sweep + table
    python3 framework/benchmarks/kernels/device_check.py --out "$OUT" --no-tests --no-sweep

1. Runs ``tests/test_triton_attention.py`` (every test, including the ``gpu``-marked large shapes) under
   pytest, in parallel workers so the many kernel variants compile concurrently.
2. Decode micro-benchmark (issue 4): Llama-3-8B attention shapes (32 query heads, 8 KV heads, d=128,
   bf16), batch 64/256 x context 1k/4k/16k x block size 16/64. It reports achieved KV bytes/s (K and V
   of every context token read once) of our paged kernel beside ``torch.nn.functional.
   scaled_dot_product_attention`` on contiguous, non-paged K/V of the same shapes and values. Both are
   timed as CUDA-graph replays (one call per graph) with CUDA events after warm-up; the median of
   ``--reps`` replays is reported. SDPA runs as ``enable_gqa=True`` with its default backend choice; the
   backends that accept it are also forced one by one, and a "packed" form (each KV group's query heads
   as query rows, which needs no GQA support) is timed too; the best of all SDPA forms is reported beside
   the default. Outputs are compared between the paged kernel and SDPA at every size.
3. Optionally first sweeps decode launch parameters on a few sizes and benchmarks with the best.

Each (batch, context) shape of the table is measured in a fresh child process, so that allocations of
earlier shapes cannot shape its memory: one earlier run measured batch 256 x 1k at block size 16 at 0.87
of SDPA late in one long process, against 0.99 for the same kernel earlier in that process (cause not
established). One shape is re-measured in the parent to compare.

Writes ``decode_bench.md`` (the table), ``decode_bench.json`` and logs under ``--out``.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
HQ, HKV, D = 32, 8, 128


def ensure_importable() -> None:
    """Make ``pagedserve``/``pagedserve_plugins`` importable from a bare checkout (no pip install)."""
    try:
        import pagedserve_plugins.triton_attention  # noqa: F401
    except ImportError:
        shim = Path(tempfile.mkdtemp(prefix="pagedserve_path_"))
        (shim / "pagedserve").symlink_to(REPO / "framework")
        (shim / "pagedserve_plugins").symlink_to(REPO / "plugins")
        sys.path.insert(0, str(shim))
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH")]))


def script_args(reps: int) -> argparse.Namespace:
    """Parse a small device script's ``--out`` and ``--reps``, then make the project importable."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "device_out"))
    ap.add_argument("--reps", type=int, default=reps, help="CUDA-graph replays per timing")
    args = ap.parse_args()
    ensure_importable()
    return args


def compact(row: dict) -> str:
    return json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})


def log(msg: str, fh=None) -> None:
    print(msg, flush=True)
    if fh is not None:
        fh.write(msg + "\n")
        fh.flush()


def run_tests(out: Path, workers: int) -> bool:
    cmd = [sys.executable, "-m", "pytest", str(REPO / "tests/test_triton_attention.py"), "-q", "-rfE"]
    cmd += ["-p", "no:cacheprovider", "--no-header"]
    if workers > 1:
        cmd += ["-n", str(workers)]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    (out / "pytest_gpu.log").write_text(proc.stdout + "\n" + proc.stderr)
    tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
    print(f"[tests] rc={proc.returncode} in {time.time() - t0:.0f}s\n{tail}", flush=True)
    return proc.returncode == 0


def graph_time_ms(fn, reps: int) -> float:
    """Median time of one replay of a CUDA graph holding one call of ``fn``."""
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    times = event_times_ms(g.replay, reps)
    del g
    return statistics.median(times)


def eager_time_ms(fn, reps: int) -> float:
    """Median time of one call of ``fn`` launched eagerly (after three warm-up calls)."""
    for _ in range(3):
        fn()
    return statistics.median(event_times_ms(fn, reps))


def event_times_ms(fn, reps: int) -> list[float]:
    """GPU time of each of ``reps`` calls of ``fn``, between CUDA events around it, one call at a time."""
    import torch

    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def kernel_names(fn) -> list[str]:
    """Names of the GPU kernels one call of ``fn`` launches (to say which SDPA backend ran)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    try:
        fn()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize()
        names = [e.key for e in prof.key_averages() if getattr(e, "device_time_total", 1) > 0]
    except Exception as exc:  # profiler trouble is not worth failing the run
        return [f"profiler failed: {exc!r}"[:200]]
    return [n[:90] for n in names]


class Case:
    """Contiguous K/V for SDPA ``[B, Hkv, L, D]`` and the same values in a shuffled paged cache."""

    def __init__(self, batch: int, ctx: int, seed: int):
        import torch

        g = torch.Generator(device="cuda").manual_seed(seed)
        self.batch, self.ctx = batch, ctx
        shape = (batch, HKV, ctx, D)
        self.k = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
        self.v = torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g)
        self.q = torch.randn((batch, HQ, D), device="cuda", dtype=torch.bfloat16, generator=g)
        self.context_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        self.kv_bytes = 2 * batch * ctx * HKV * D * 2
        self.scale = D**-0.5
        self.paged = {}

    def paged_cache(self, block_size: int):
        import torch

        if block_size not in self.paged:
            self.paged.clear()
            torch.cuda.empty_cache()
            pages_per_seq = self.ctx // block_size
            n = self.batch * pages_per_seq
            perm = torch.randperm(n, device="cuda")
            caches = []
            for src in (self.k, self.v):
                cache = torch.empty((n, block_size, HKV, D), device="cuda", dtype=torch.bfloat16)
                cache[perm] = src.transpose(1, 2).reshape(n, block_size, HKV, D)
                caches.append(cache)
            tables = perm.view(self.batch, pages_per_seq).to(torch.int32)
            self.paged[block_size] = (caches[0], caches[1], tables)
        return self.paged[block_size]

    def sdpa_forms(self):
        import torch.nn.functional as F

        q4 = self.q[:, :, None, :]  # [B, Hq, 1, D]
        qp = self.q.view(self.batch, HKV, HQ // HKV, D)  # a group's query heads as query rows

        def gqa():
            return F.scaled_dot_product_attention(q4, self.k, self.v, scale=self.scale, enable_gqa=True)

        def packed():
            return F.scaled_dot_product_attention(qp, self.k, self.v, scale=self.scale)

        return {"gqa": gqa, "packed": packed}


def sdpa_measure(case: Case, reps: int) -> dict:
    """Time SDPA forms: default backend, and each non-math backend forced; returns name -> ms."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    res = {}
    for form, fn in case.sdpa_forms().items():
        res[f"{form}/default"] = graph_time_ms(fn, reps)
        for be in (SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            key = f"{form}/{be.name.lower()}"
            with sdpa_kernel([be]):
                try:  # eagerly first: a refusal must not happen inside a graph capture
                    fn()
                    torch.cuda.synchronize()
                except Exception as exc:  # this backend refuses these shapes
                    res[key] = f"n/a ({type(exc).__name__})"
                    continue
                res[key] = graph_time_ms(fn, reps)
    return res


def decode_config(bmod, fp8: bool = False) -> dict:
    """The decode launch parameters the backend module uses now (what set_decode_config sets), for a cache
    of q's dtype or (``fp8``) a float8 cache."""
    launch = bmod.DECODE_FP8_LAUNCH if fp8 else bmod.DECODE_LAUNCH
    return {
        "tile": launch.tile,
        "warps": launch.warps,
        "stages": launch.stages,
        "pps": launch.programs_per_sm,
        "heads_first": bmod.DECODE_HEADS_FIRST,
    }


def write_report(out: Path, name: str, lines: list[str], rows: list[dict]) -> None:
    """Print a Markdown table and save it as ``name.md``, its rows as ``name.json``, under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    (out / f"{name}.json").write_text(json.dumps(rows, indent=2))
    print("\n".join(lines))


def set_decode_config(bmod, cfg: dict, fp8: bool = False) -> None:
    launch = bmod.DecodeLaunch(
        tile=cfg["tile"], warps=cfg["warps"], stages=cfg["stages"], programs_per_sm=cfg["pps"]
    )
    if fp8:
        bmod.DECODE_FP8_LAUNCH = launch
    else:
        bmod.DECODE_LAUNCH = launch
    bmod.DECODE_HEADS_FIRST = cfg["heads_first"]


def paged_fn(be, case: Case, block_size: int, out):
    kc, vc, bt = case.paged_cache(block_size)
    return lambda: be.decode(case.q, kc, vc, bt, case.context_lens, case.scale, out=out)


def prefill_bench(be, reps: int, fh) -> list[dict]:
    """Whole-prompt causal prefill through the block table, beside SDPA causal on contiguous K/V."""
    import torch
    import torch.nn.functional as F

    rows = []
    for seqs, length in ((16, 1024), (4, 4096)):
        try:
            g = torch.Generator(device="cuda").manual_seed(length)
            total = seqs * length
            q = torch.randn((total, HQ, D), device="cuda", dtype=torch.bfloat16, generator=g)
            k = torch.randn((total, HKV, D), device="cuda", dtype=torch.bfloat16, generator=g)
            v = torch.randn((total, HKV, D), device="cuda", dtype=torch.bfloat16, generator=g)
            cu = torch.arange(0, total + 1, length, dtype=torch.int32, device="cuda")
            ctx = torch.full((seqs,), length, dtype=torch.int32, device="cuda")
            flops = seqs * 2 * 2 * (length * (length + 1) / 2) * HQ * D
            qs = q.view(seqs, length, HQ, D).transpose(1, 2)
            ks = k.view(seqs, length, HKV, D).transpose(1, 2)
            vs = v.view(seqs, length, HKV, D).transpose(1, 2)
            sdpa = functools.partial(
                F.scaled_dot_product_attention, qs, ks, vs, is_causal=True, enable_gqa=True
            )
            t_sdpa = graph_time_ms(sdpa, reps)
            ref = sdpa().transpose(1, 2).reshape(total, HQ, D).float()
            for bs in (16, 64):
                n = total // bs
                perm = torch.randperm(n, device="cuda")
                kc = torch.empty((n, bs, HKV, D), device="cuda", dtype=torch.bfloat16)
                vc = torch.empty_like(kc)
                slots = (
                    perm.view(seqs, length // bs)[:, :, None] * bs + torch.arange(bs, device="cuda")
                ).reshape(-1)
                be.store_kv(k, v, kc, vc, slots)
                bt = perm.view(seqs, length // bs).to(torch.int32)
                o = torch.full_like(q, float("nan"))
                fn = lambda: be.prefill(q, kc, vc, cu, ctx, bt, D**-0.5, out=o)  # noqa: E731, B023
                fn()
                torch.cuda.synchronize()
                err = ((o.float() - ref).norm() / ref.norm()).item()
                t = graph_time_ms(fn, reps)
                row = {
                    "seqs": seqs,
                    "len": length,
                    "block_size": bs,
                    "paged_us": t * 1e3,
                    "paged_tflops": flops / t / 1e9,
                    "sdpa_us": t_sdpa * 1e3,
                    "sdpa_tflops": flops / t_sdpa / 1e9,
                    "rel_err_vs_sdpa": err,
                }
                rows.append(row)
                log(f"[prefill] {compact(row)}", fh)
        except Exception as exc:
            log(f"[prefill] {seqs}x{length} failed: {type(exc).__name__}: {str(exc)[:300]}", fh)
    return rows


def measure_case(be, batch: int, ctx: int, reps: int, fh, log_kernels: bool = False) -> list[dict]:
    """SDPA forms and the paged kernel (block sizes 16 and 64) on one (batch, context) shape."""
    import torch

    rows = []
    case = Case(batch, ctx, seed=batch * 7 + ctx)
    sd = sdpa_measure(case, reps)
    if log_kernels:
        for form, fn in case.sdpa_forms().items():
            log(f"[sdpa] {form} default kernels at B={batch} L={ctx}: {kernel_names(fn)}", fh)
    log(
        f"[sdpa] B={batch} L={ctx}: "
        + ", ".join(f"{k}={v if isinstance(v, str) else round(v * 1e3, 1)}" for k, v in sd.items()),
        fh,
    )
    numeric = {k: v for k, v in sd.items() if not isinstance(v, str)}
    best_form = min(numeric, key=numeric.get)
    ref_out = case.sdpa_forms()["gqa"]()[:, :, 0, :].float()
    for bs in (16, 64):
        o = torch.full_like(case.q, float("nan"))
        fn = paged_fn(be, case, bs, o)
        fn()
        torch.cuda.synchronize()
        err = ((o.float() - ref_out).norm() / ref_out.norm()).item()
        t_graph = graph_time_ms(fn, reps)
        t_eager = eager_time_ms(fn, reps)
        row = {
            "batch": batch,
            "ctx": ctx,
            "block_size": bs,
            "paged_us": t_graph * 1e3,
            "paged_eager_us": t_eager * 1e3,
            "paged_TBps": case.kv_bytes / t_graph / 1e9,
            "sdpa_us": sd["gqa/default"] * 1e3,
            "sdpa_TBps": case.kv_bytes / sd["gqa/default"] / 1e9,
            "best_sdpa": best_form,
            "best_sdpa_TBps": case.kv_bytes / numeric[best_form] / 1e9,
            "rel_err_vs_sdpa": err,
            "nan": bool(torch.isnan(o).any()),
        }
        row["ratio"] = row["paged_TBps"] / row["sdpa_TBps"]
        row["ratio_best"] = row["paged_TBps"] / row["best_sdpa_TBps"]
        rows.append(row)
        log(f"[bench] {compact(row)}", fh)

    return rows


def case_in_child(batch: int, ctx: int, cfg: dict, reps: int, fh, log_kernels: bool) -> list[dict]:
    """Run :func:`measure_case` in a fresh process, so no earlier allocation shapes its memory."""
    cmd = [sys.executable, __file__, "--one-case", f"{batch},{ctx}", "--config", json.dumps(cfg)]
    cmd += ["--reps", str(reps)] + (["--log-kernels"] if log_kernels else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    rows = []
    for line in proc.stdout.splitlines():
        if line.startswith("ROWS "):
            rows = json.loads(line[5:])
        elif line.startswith("["):
            log(line, fh)
    if proc.returncode or not rows:
        log(f"[bench] child for B={batch} L={ctx} failed rc={proc.returncode}: {proc.stderr[-3000:]}", fh)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "device_out"))
    ap.add_argument("--no-tests", action="store_true")
    ap.add_argument("--no-sweep", action="store_true")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--one-case", help="internal: B,L measured in this process, rows printed as JSON")
    ap.add_argument("--config", help="internal: decode config as JSON")
    ap.add_argument("--log-kernels", action="store_true")
    args = ap.parse_args()
    if args.one_case:
        ensure_importable()
        from pagedserve_plugins.triton_attention import backend as bmod

        set_decode_config(bmod, json.loads(args.config))
        batch, ctx = map(int, args.one_case.split(","))
        rows = measure_case(bmod.TritonAttentionBackend(), batch, ctx, args.reps, None, args.log_kernels)
        print("ROWS " + json.dumps(rows), flush=True)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ensure_importable()

    import torch
    import triton

    fh = open(out / "device_check.log", "w")  # noqa: SIM115
    props = torch.cuda.get_device_properties(0)
    log(
        f"torch {torch.__version__}, triton {triton.__version__}, {props.name}, "
        f"{props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB",
        fh,
    )
    ok = True
    if not args.no_tests:
        ok = run_tests(out, args.workers)
        log(f"[tests] {'PASSED' if ok else 'FAILED'}", fh)

    from pagedserve_plugins.triton_attention import backend as bmod

    be = bmod.TritonAttentionBackend()
    default_cfg = decode_config(bmod)
    cases: dict[tuple[int, int], Case] = {}

    def get_case(batch, ctx):
        if (batch, ctx) not in cases:
            cases.clear()
            torch.cuda.empty_cache()
            cases[(batch, ctx)] = Case(batch, ctx, seed=batch * 7 + ctx)
        return cases[(batch, ctx)]

    # ---------------------------------------------------------------- copy-bandwidth ceiling
    src = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = eager_time_ms(functools.partial(dst.copy_, src), 10)
    log(f"[ceiling] device-to-device copy: {2 * src.numel() / ms / 1e9:.2f} TB/s (read + write)", fh)
    src = dst = None
    torch.cuda.empty_cache()

    # ---------------------------------------------------------------- sweep
    best_cfg = default_cfg
    if not args.no_sweep:
        sweep_sizes = [(64, 1024, 16), (256, 1024, 16), (64, 16384, 64), (256, 4096, 16)]
        configs = [default_cfg]
        shapes = [
            (64, 4, 2),
            (64, 4, 3),
            (64, 8, 2),
            (32, 4, 2),
            (32, 4, 3),
            (128, 4, 2),
        ]  # tile, warps, stages
        for (tile, warps, stages), pps, hf in itertools.product(shapes, (2, 4, 8), (True, False)):
            cfg = {"tile": tile, "warps": warps, "stages": stages, "pps": pps, "heads_first": hf}
            if cfg not in configs:
                configs.append(cfg)
        sdpa_ref = {}
        scores = []
        t0 = time.time()
        for batch, ctx, bs in sweep_sizes:
            case = get_case(batch, ctx)
            if (batch, ctx) not in sdpa_ref:
                sdpa_ref[(batch, ctx)] = graph_time_ms(case.sdpa_forms()["gqa"], 10)
            o = torch.empty_like(case.q)
            for i, cfg in enumerate(configs):
                set_decode_config(bmod, cfg)
                try:
                    t = graph_time_ms(paged_fn(be, case, bs, o), 10)
                except Exception as exc:
                    log(f"[sweep] {cfg} failed: {type(exc).__name__}: {str(exc)[:200]}", fh)
                    t = float("inf")
                if len(scores) <= i:
                    scores.append([])
                scores[i].append(sdpa_ref[(batch, ctx)] / t)
        for cfg, sc in zip(configs, scores, strict=True):
            gm = math.exp(sum(math.log(max(v, 1e-9)) for v in sc) / len(sc))
            cfg["score"] = round(gm, 4)
            cfg["worst"] = round(min(sc), 4)
            log(f"[sweep] {cfg} ratios {[round(v, 3) for v in sc]}", fh)
        ranked = sorted(configs, key=lambda c: (c["worst"], c["score"]), reverse=True)
        best_cfg = {k: ranked[0][k] for k in ("tile", "warps", "stages", "pps", "heads_first")}
        log(f"[sweep] {len(configs)} configs in {time.time() - t0:.0f}s; best {ranked[0]}", fh)
        log(f"[sweep] default {default_cfg} scored {configs[0]['score']} (worst {configs[0]['worst']})", fh)
    set_decode_config(bmod, best_cfg)

    # ---------------------------------------------------------------- table
    rows = []
    for n, (batch, ctx) in enumerate(itertools.product((64, 256), (1024, 4096, 16384))):
        cases.clear()
        torch.cuda.empty_cache()
        rows += case_in_child(batch, ctx, best_cfg, args.reps, fh, log_kernels=n == 0)
    # the same shape once more inside this (by now much-allocated) process, for comparison only
    set_decode_config(bmod, best_cfg)
    for r in measure_case(be, 256, 1024, args.reps, None):
        log(f"[bench-same-process] {compact(r)}", fh)

    prefill_rows = prefill_bench(be, args.reps, fh)

    header = (
        "| batch | context | block | paged µs | paged TB/s | SDPA µs | SDPA TB/s | paged/SDPA "
        "| best SDPA form | best SDPA TB/s | paged/best | rel err |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['batch']} | {r['ctx']} | {r['block_size']} | {r['paged_us']:.1f} | {r['paged_TBps']:.2f} "
        f"| {r['sdpa_us']:.1f} | {r['sdpa_TBps']:.2f} | {r['ratio']:.2f} | {r['best_sdpa']} "
        f"| {r['best_sdpa_TBps']:.2f} | {r['ratio_best']:.2f} | {r['rel_err_vs_sdpa']:.1e} |\n"
        for r in rows
    )
    note = (
        f"\nLlama-3-8B decode attention (Hq=32, Hkv=8, d=128, bf16), {props.name}, "
        f"torch {torch.__version__}, triton {triton.__version__}. "
        f"KV bytes = 2 (K,V) x B x L x 8 x 128 x 2 B. Median of {args.reps} "
        f"CUDA-graph replays, each shape in a fresh process. "
        f"SDPA = scaled_dot_product_attention(enable_gqa=True), default backend, "
        f"contiguous [B, Hkv, L, D]. Decode config: {best_cfg}.\n"
    )
    table = header + body + note
    if prefill_rows:
        table += (
            "\nPrefill (causal, every token new, Hq=32, Hkv=8, d=128, bf16; "
            "FLOPs = 2 x 2 x T(T+1)/2 x Hq x d per sequence):\n\n"
            "| seqs x len | block | paged µs | paged TFLOP/s | SDPA causal µs | SDPA TFLOP/s "
            "| paged/SDPA |\n|---|---:|---:|---:|---:|---:|---:|\n"
        )
        table += "".join(
            f"| {r['seqs']} x {r['len']} | {r['block_size']} | {r['paged_us']:.0f} | {r['paged_tflops']:.0f} "
            f"| {r['sdpa_us']:.0f} | {r['sdpa_tflops']:.0f} | {r['paged_tflops'] / r['sdpa_tflops']:.2f} |\n"
            for r in prefill_rows
        )
    (out / "decode_bench.md").write_text(table)
    (out / "decode_bench.json").write_text(
        json.dumps({"config": best_cfg, "rows": rows, "prefill": prefill_rows, "tests_ok": ok}, indent=1)
    )
    log("\n" + table, fh)
    worst = min(r["ratio"] for r in rows)
    log(f"worst paged/SDPA ratio {worst:.3f}; tests {'PASSED' if ok else 'FAILED'}", fh)
    fh.close()
    return 0 if ok and not any(r["nan"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
