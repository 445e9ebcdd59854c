"""Can decode attention hide under the matmuls? One Llama-3-8B decoder layer's work, timed on a GPU.

    python3 framework/benchmarks/kernels/overlap_check.py --out "$OUT"

The offline benchmark's decode steps run attention after the matmuls, one kernel at a time; the cost
model in ``docs/benchmarks.md`` says the 13,000 tok/s goal needs the two to overlap. This measures
whether they can, for one layer at decode batch B and context L (block size 16, bf16, GQA 32/8, d=128):

- ``gemms(M)``: the layer's four linears at M rows (qkv 4096→6144, o 4096→4096, gate_up 4096→28672,
  down 14336→4096) as ``F.linear``;
- ``attn(B)``: our paged decode kernel over B sequences of L tokens;
- ``sequential``: ``gemms(B)`` then ``attn(B)``, today's order;
- ``two streams``: two micro-batches of B/2: ``gemms(B/2)`` twice on one stream while ``attn(B/2)``
  twice runs on another (the best a two-micro-batch pipeline could do, dependencies aside).

Each is one CUDA graph (multi-stream capture for the last), median of ``--reps`` replays timed with
CUDA events. ``gain`` = sequential / two streams; above 1 the overlap pays despite doubling weight reads.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
HIDDEN, INTER, HQ, HKV, D, BLOCK = 4096, 14336, 32, 8, 128, 16
LINEARS = [(HIDDEN, (HQ + 2 * HKV) * D), (HQ * D, HIDDEN), (HIDDEN, 2 * INTER), (INTER, HIDDEN)]


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from device_check import graph_time_ms, script_args, write_report

    args = script_args(reps=50)
    import torch
    import torch.nn.functional as F
    from pagedserve_plugins.triton_attention.backend import TritonAttentionBackend

    backend = TritonAttentionBackend()
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.01 for k, n in LINEARS]

    def gemms(x: dict[int, torch.Tensor]):
        return lambda: [F.linear(x[k], w) for (k, _), w in zip(LINEARS, weights, strict=True)]

    def attention(batch: int, ctx: int):
        g = torch.Generator(device="cuda").manual_seed(batch + ctx)
        pages = batch * (ctx // BLOCK)
        k = torch.randn((pages, BLOCK, HKV, D), device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn_like(k)
        tables = torch.randperm(pages, device="cuda").view(batch, -1).to(torch.int32)
        q = torch.randn((batch, HQ, D), device="cuda", dtype=torch.bfloat16, generator=g)
        lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
        out = torch.empty_like(q)
        return lambda: backend.decode(q, k, v, tables, lens, D**-0.5, out=out)

    def inputs(m: int) -> dict[int, torch.Tensor]:
        return {k: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for k in {k for k, _ in LINEARS}}

    side = torch.cuda.Stream()

    def two_streams(mm, attn):
        def run():
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                attn()
                attn()
            mm()
            mm()
            torch.cuda.current_stream().wait_stream(side)

        return run

    rows = []
    for batch in (128, 256, 512):
        mm_full, mm_half = gemms(inputs(batch)), gemms(inputs(batch // 2))
        t_mm_full, t_mm_half = graph_time_ms(mm_full, args.reps), graph_time_ms(mm_half, args.reps)
        for ctx in (512, 1024, 2048):
            attn_full, attn_half = attention(batch, ctx), attention(batch // 2, ctx)
            t_attn = graph_time_ms(attn_full, args.reps)
            t_seq = graph_time_ms(lambda a=attn_full, m=mm_full: (m(), a()), args.reps)
            t_two = graph_time_ms(two_streams(mm_half, attn_half), args.reps)
            flops = 2 * batch * sum(k * n for k, n in LINEARS)
            row = {
                "batch": batch,
                "ctx": ctx,
                "gemms_us": t_mm_full * 1e3,
                "gemm_tflops": flops / t_mm_full / 1e9,
                "gemms_half_x2_us": 2 * t_mm_half * 1e3,
                "attn_us": t_attn * 1e3,
                "sequential_us": t_seq * 1e3,
                "two_streams_us": t_two * 1e3,
                "gain": t_seq / t_two,
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
            del attn_full, attn_half
            torch.cuda.empty_cache()
    lines = [
        "| batch | context | gemms µs | gemm TFLOP/s | 2 × gemms(B/2) µs | attn µs | sequential µs "
        "| two streams µs | gain |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batch']} | {r['ctx']} | {r['gemms_us']:.0f} | {r['gemm_tflops']:.0f} | "
            f"{r['gemms_half_x2_us']:.0f} | {r['attn_us']:.0f} | {r['sequential_us']:.0f} | "
            f"{r['two_streams_us']:.0f} | {r['gain']:.2f} |"
        )
    write_report(Path(args.out), "overlap", lines, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
