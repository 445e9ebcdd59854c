"""Why float8 decode is not twice as fast: Nsight Compute counters of our decode kernel, bf16 vs float8.

    python3 framework/benchmarks/kernels/decode_ncu_check.py --out "$OUT"

Profiles one launch of ``decode_partition_kernel`` per cache dtype (batch 256, context 4096, Llama-3-8B
shapes, block 16, default launch parameters) with ``ncu --clock-control none`` and prints, side by side,
DRAM throughput, occupancy, the shared-memory traffic and the warp stall reasons per issued instruction.
``--child DTYPE`` is the profiled process: it runs the kernel a few times and exits.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
BATCH, CONTEXT = 256, 4096
METRICS = [
    "gpu__time_duration.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "launch__registers_per_thread",
    "launch__occupancy_limit_registers",
    "launch__occupancy_limit_shared_mem",
    "sm__warps_active.avg.per_cycle_active",
    "smsp__inst_executed.sum",
    "smsp__sass_inst_executed_op_shared_ld.sum",
    "smsp__sass_inst_executed_op_shared_st.sum",
    "smsp__sass_inst_executed_op_ldsm.sum",
    "smsp__sass_inst_executed_op_global_ld.sum",
    "l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum",
]
STALLS = "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\\.ratio"


def child(dtype: str) -> None:
    from device_check import Case, ensure_importable

    ensure_importable()
    import torch
    from pagedserve_plugins.triton_attention.backend import TritonAttentionBackend

    be = TritonAttentionBackend()
    case = Case(BATCH, CONTEXT, seed=1)
    k, v, tables = case.paged_cache(16)
    if dtype == "fp8":
        k, v = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    out = torch.empty_like(case.q)
    for _ in range(4):  # the first launches compile; ncu profiles the last
        be.decode(case.q, k, v, tables, case.context_lens, case.scale, out=out)
    torch.cuda.synchronize()


def profile(dtype: str) -> dict[str, str]:
    cmd = ["ncu", "--clock-control", "none", "--kernel-name", "regex:decode_partition", "--launch-skip", "3",
           "--launch-count", "1", "--metrics", ",".join(METRICS) + "," + STALLS,
           sys.executable, __file__, "--child", dtype]  # fmt: skip
    text = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    values = {}
    for line in text.splitlines():
        match = re.match(r"\s+([a-z0-9_]+__[\w.]+)\s+(\S+)?\s+([\d,.]+)$", line)
        if match:
            name = match.group(1).replace("smsp__average_warps_issue_stalled_", "stall ")
            values[name.replace("_per_issue_active.ratio", "")] = match.group(3)
    return values


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="device_out")
    ap.add_argument("--child", choices=("bf16", "fp8"))
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))  # device_check, the other device scripts' helpers
    if args.child:
        child(args.child)
        return 0
    bf16, fp8 = profile("bf16"), profile("fp8")
    lines = [f"decode_partition_kernel, batch {BATCH} x context {CONTEXT}, block 16", "",
             "| counter | bf16 cache | float8 cache |", "|---|---:|---:|"]  # fmt: skip
    lines += [f"| {name} | {bf16.get(name, '-')} | {fp8.get(name, '-')} |" for name in bf16]
    from device_check import write_report

    write_report(Path(args.out), "decode_ncu", lines, [{"cache": "bf16", **bf16}, {"cache": "fp8", **fp8}])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
