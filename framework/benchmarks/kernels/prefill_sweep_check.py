"""Which launch parameters suit the causal prefill kernel? A sweep on the offline workload's prompt mix.

    python3 framework/benchmarks/kernels/prefill_sweep_check.py --out "$OUT"

Llama-3-8B shapes (32 query heads, 8 KV heads, d=128, block size 16), whole prompts read back through
the block table from a bf16 cache and from a float8 (e4m3) cache of the same values; each cache dtype
has its own defaults (``PREFILL_LAUNCH``, ``PREFILL_FP8_LAUNCH``), and "vs default" compares with them.
Two batches: the standard workload's first prompts up to 8192 tokens (lengths uniform in [64, 1024], as
one prefill step of ``bench`` sees them) and 16 x 1024. Each point is the median of ``--reps``
CUDA-graph replays; its output is compared with the default parameters' output. SDPA (causal,
contiguous K/V, one call per prompt, times summed) gives a reference for the uniform batch.
"""

from __future__ import annotations

import functools
import itertools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
BS = 16
SWEEP = list(itertools.product((64, 128), (32, 64, 128), (4, 8), (2, 3)))  # rows, tile, warps, stages


def workload_lengths(budget: int = 8192) -> list[int]:
    """The standard workload's first prompt lengths whose sum fits one ``budget``-token step."""
    from pagedserve.benchmarks.workload import standard_workload

    lengths: list[int] = []
    for request in standard_workload(64):
        if sum(lengths) + len(request.prompt_token_ids) > budget:
            break
        lengths.append(len(request.prompt_token_ids))
    return lengths


def prefill_config(bmod, fp8: bool) -> tuple[int, int, int, int]:
    launch = bmod.PREFILL_FP8_LAUNCH if fp8 else bmod.PREFILL_LAUNCH
    return launch.rows, launch.tile, launch.warps, launch.stages


def set_prefill_config(bmod, cfg: tuple[int, int, int, int], fp8: bool) -> None:
    launch = bmod.PrefillLaunch(*cfg)
    if fp8:
        bmod.PREFILL_FP8_LAUNCH = launch
    else:
        bmod.PREFILL_LAUNCH = launch


class Batch:
    """Packed prompts with their K/V stored in a shuffled paged cache of each dtype."""

    def __init__(self, be, lengths: list[int], seed: int) -> None:
        import torch
        from device_check import HKV, HQ, D

        self.lengths, total = lengths, sum(lengths)
        g = torch.Generator(device="cuda").manual_seed(seed)
        self.q, self.k, self.v = (
            torch.randn((total, heads, D), device="cuda", dtype=torch.bfloat16, generator=g)
            for heads in (HQ, HKV, HKV)
        )
        starts = [0, *itertools.accumulate(lengths)]
        self.cu = torch.tensor(starts, dtype=torch.int32, device="cuda")
        self.ctx = torch.tensor(lengths, dtype=torch.int32, device="cuda")
        blocks = [-(-n // BS) for n in lengths]
        perm = torch.randperm(sum(blocks), device="cuda")
        self.tables = torch.zeros((len(lengths), max(blocks)), dtype=torch.int32, device="cuda")
        slots = []
        for i, (n, start) in enumerate(zip(lengths, itertools.accumulate([0, *blocks]), strict=False)):
            row = perm[start : start + blocks[i]]
            self.tables[i, : blocks[i]] = row.to(torch.int32)
            slots.append((row[:, None] * BS + torch.arange(BS, device="cuda")).reshape(-1)[:n])
        slots = torch.cat(slots)
        self.caches = {}
        for dtype in (torch.bfloat16, torch.float8_e4m3fn):
            kc = torch.empty((sum(blocks), BS, HKV, D), device="cuda", dtype=dtype)
            vc = torch.empty_like(kc)
            be.store_kv(self.k, self.v, kc, vc, slots)
            self.caches[dtype] = (kc, vc)
        self.out = torch.empty_like(self.q)
        self.flops = sum(2 * 2 * n * (n + 1) / 2 * HQ * D for n in lengths)

    def fn(self, be, dtype):
        from device_check import D

        kc, vc = self.caches[dtype]
        return lambda: be.prefill(self.q, kc, vc, self.cu, self.ctx, self.tables, D**-0.5, out=self.out)

    def sdpa_us(self, reps: int) -> float:
        """Causal SDPA per prompt, each on contiguous K/V (the sum of the prompts' times)."""
        import torch.nn.functional as F
        from device_check import graph_time_ms

        total, start = 0.0, 0
        for n in self.lengths:
            q, k, v = (t[start : start + n].transpose(0, 1)[None] for t in (self.q, self.k, self.v))
            sdpa = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)
            total += graph_time_ms(sdpa, reps) * 1e3
            start += n
        return total


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from device_check import graph_time_ms, script_args, write_report

    args = script_args(reps=20)
    import torch
    from pagedserve_plugins.triton_attention import backend as bmod

    be = bmod.TritonAttentionBackend()
    defaults = {fp8: prefill_config(bmod, fp8) for fp8 in (False, True)}
    batches = {"workload": workload_lengths(), "16x1024": [1024] * 16}
    rows = []
    for name, lengths in batches.items():
        batch = Batch(be, lengths, seed=len(lengths))
        sdpa = batch.sdpa_us(args.reps) if name == "16x1024" else None
        for dtype in (torch.bfloat16, torch.float8_e4m3fn):
            fp8 = dtype == torch.float8_e4m3fn
            default = defaults[fp8]
            base = graph_time_ms(batch.fn(be, dtype), args.reps) * 1e3
            reference = batch.out.clone()
            for cfg in [default] + [c for c in SWEEP if c != default]:
                set_prefill_config(bmod, cfg, fp8)
                try:
                    t = base if cfg == default else graph_time_ms(batch.fn(be, dtype), args.reps) * 1e3
                except Exception as error:  # noqa: BLE001 - e.g. out of shared memory: skip the point
                    print(f"[skip] {name} {dtype} {cfg}: {type(error).__name__}: {str(error)[:160]}")
                    continue
                err = ((batch.out.float() - reference.float()).norm() / reference.float().norm()).item()
                row = {"batch": name, "tokens": sum(lengths), "cache": str(dtype).split(".")[-1],
                       "config": cfg, "default": cfg == default, "us": t, "vs_default": t / base,
                       "tflops": batch.flops / t / 1e6, "err_vs_default": err, "sdpa_us": sdpa}  # fmt: skip
                rows.append(row)
                print(json.dumps(row), flush=True)
            set_prefill_config(bmod, default, fp8)
        del batch
        torch.cuda.empty_cache()

    lines = [
        f"defaults (rows, tile, warps, stages): bf16 cache {defaults[False]}, float8 cache {defaults[True]}",
        "",
        "| batch | cache | default µs | TFLOP/s | best µs | best / default | best config "
        "| err vs default | SDPA µs |",
        "|---|---|---:|---:|---:|---:|---|---:|---:|",
    ]
    for name in batches:
        for cache in ("bfloat16", "float8_e4m3fn"):
            mine = [r for r in rows if r["batch"] == name and r["cache"] == cache]
            if not mine:
                continue
            base = next(r for r in mine if r["default"])
            best = min(mine, key=lambda r: r["us"])
            sdpa = f"{base['sdpa_us']:.0f}" if base["sdpa_us"] else "-"
            lines.append(
                f"| {name} ({base['tokens']} tok) | {cache} | {base['us']:.0f} | {base['tflops']:.0f} | "
                f"{best['us']:.0f} | {best['vs_default']:.2f} | {best['config']} | "
                f"{best['err_vs_default']:.1e} | {sdpa} |"
            )
    for cache in ("bfloat16", "float8_e4m3fn"):
        per = {}
        for r in rows:
            if r["cache"] == cache:
                per.setdefault(tuple(r["config"]), []).append(r["vs_default"])
        full = {c: sum(v) / len(v) for c, v in per.items() if len(v) == len(batches)}
        if full:
            c = min(full, key=full.__getitem__)
            lines.append(f"\nbest single config for {cache}: {c} (mean time vs default {full[c]:.2f})")
    write_report(Path(args.out), "prefill_sweep", lines, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
