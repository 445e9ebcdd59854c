"""How close do decode steps' matmuls come to their bound? One Llama-3-8B layer's four linears (qkv,
o, gate_up, down) at decode batch sizes, through cuBLAS (torch's default) and through cuBLASLt,
beside the roofline: the larger of reading the weights at 4.2 TB/s and the FLOPs at 801 TFLOP/s (the
rates measured on this card, see the issue). The same linears with float8 weights
(``engine.quantization=fp8``: the activation's per-token quantization included) run beside them, at
the decode sizes and at prefill chunk sizes, with their error against the bf16 result.

    python3 framework/benchmarks/kernels/decode_gemm_check.py --out "$OUT"

Each time is the median of ``--reps`` CUDA-graph replays of the linear alone; "of bound" and the
per-linear columns are bound / time (1.0 = at the roofline).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
BATCHES = (64, 128, 192, 256, 320, 384, 448, 512, 2048, 8192)
NAMES = ("qkv", "o", "gate_up", "down")
HBM_BYTES_PER_S, BF16_FLOPS = 4.2e12, 801e12


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from device_check import graph_time_ms, script_args, write_report
    from overlap_check import LINEARS

    args = script_args(reps=50)
    import torch
    import torch.nn.functional as F
    from pagedserve.models.layers.quantization import fp8_linear, quantize_rows

    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.01 for k, n in LINEARS]
    quantized = [quantize_rows(w) for w in weights]
    rows = []
    for batch in BATCHES:
        for name, (k, n), w, (wq, ws) in zip(NAMES, LINEARS, weights, quantized, strict=True):
            x = torch.randn(batch, k, device="cuda", dtype=torch.bfloat16)
            bound = max(2 * k * n / HBM_BYTES_PER_S, 2 * batch * k * n / BF16_FLOPS)
            row = {"batch": batch, "linear": name, "k": k, "n": n, "bound_us": bound * 1e6}
            for library in ("cublas", "cublaslt"):
                torch.backends.cuda.preferred_blas_library(library)
                row[f"{library}_us"] = graph_time_ms(lambda x=x, w=w: F.linear(x, w), args.reps) * 1e3
            torch.backends.cuda.preferred_blas_library("cublas")
            fp8 = lambda x=x, wq=wq, ws=ws: fp8_linear(x, wq, ws.view(1, -1), None)  # noqa: E731
            row["fp8_us"] = graph_time_ms(fp8, args.reps) * 1e3
            xq, xs = quantize_rows(x)
            mm = lambda xq=xq, xs=xs, wq=wq, ws=ws: torch._scaled_mm(  # noqa: E731
                xq, wq.t(), scale_a=xs, scale_b=ws.view(1, -1), out_dtype=torch.bfloat16
            )
            row["fp8_mm_us"] = graph_time_ms(mm, args.reps) * 1e3
            want = F.linear(x, w).float()
            row["fp8_rel_err"] = ((fp8().float() - want).norm() / want.norm()).item()
            rows.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        "| batch | bound µs (4 linears) | cuBLAS µs | of bound | cuBLASLt µs | of bound | "
        + " | ".join(f"{name} (cuBLAS)" for name in NAMES)
        + " | fp8 µs | fp8 / cuBLAS | fp8 matmuls alone µs | fp8 rel err |",
        "|---:|---:|---:|---:|---:|---:|" + "---:|" * len(NAMES) + "---:|---:|---:|---:|",
    ]
    for batch in BATCHES:
        mine = [r for r in rows if r["batch"] == batch]
        bound = sum(r["bound_us"] for r in mine)
        blas, lt = sum(r["cublas_us"] for r in mine), sum(r["cublaslt_us"] for r in mine)
        fp8, fp8_mm = sum(r["fp8_us"] for r in mine), sum(r["fp8_mm_us"] for r in mine)
        err = max(r["fp8_rel_err"] for r in mine)
        per = " | ".join(f"{r['bound_us'] / r['cublas_us']:.2f}" for r in mine)
        cells = f"{bound:.0f} | {blas:.0f} | {bound / blas:.2f} | {lt:.0f} | {bound / lt:.2f}"
        fp8_cells = f"{fp8:.0f} | {fp8 / blas:.2f} | {fp8_mm:.0f} | {err:.1e}"
        lines.append(f"| {batch} | {cells} | {per} | {fp8_cells} |")
    write_report(Path(args.out), "decode_gemm", lines, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
