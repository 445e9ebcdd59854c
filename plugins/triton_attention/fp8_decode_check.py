"""Does a float8 KV cache make paged decode faster? Our decode kernel on a bf16 cache and on the same
values cast to float8 (e4m3), timed side by side, and a small sweep of launch parameters for float8.

    python3 plugins/triton_attention/fp8_decode_check.py --out "$OUT"

Llama-3-8B decode shapes (32 query heads, 8 KV heads, d=128, block size 16). A float8 cache holds half
the bytes, so a kernel bound by KV reads would take half the time: ``fp8/bf16`` is the time ratio (0.5
ideal). Each launch configuration (KV tile, warps, pipeline stages, programs per SM) is timed as the
median of ``--reps`` CUDA-graph replays; outputs are checked against the bf16 cache's.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHAPES = [(64, 1024), (256, 1024), (64, 4096), (256, 4096)]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "device_out"))
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    sys.path.insert(0, str(REPO / "plugins" / "triton_attention"))
    from device_check import (
        Case,
        decode_config,
        ensure_importable,
        graph_time_ms,
        set_decode_config,
        write_report,
    )

    ensure_importable()
    import torch
    from pagedserve_plugins.triton_attention import backend as bmod

    be = bmod.TritonAttentionBackend()
    default = decode_config(bmod)
    configs = [default] + [
        {"tile": t, "warps": w, "stages": s, "pps": p, "heads_first": True}
        for t, w, s, p in itertools.product((64, 128), (4, 8), (2, 3, 4), (2, 4))
        if (t, w, s, p) != (default["tile"], default["warps"], default["stages"], default["pps"])
    ]
    rows = []
    for batch, ctx in SHAPES:
        case = Case(batch, ctx, seed=batch * 7 + ctx)
        kc, vc, tables = case.paged_cache(16)
        k8, v8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
        out = torch.empty_like(case.q)

        def decode(k, v, out=out, case=case, tables=tables):
            return lambda: be.decode(case.q, k, v, tables, case.context_lens, case.scale, out=out)

        set_decode_config(bmod, default)
        t_bf16 = graph_time_ms(decode(kc, vc), args.reps)
        reference = out.clone()
        for cfg in configs:
            set_decode_config(bmod, cfg)
            try:
                t_fp8 = graph_time_ms(decode(k8, v8), args.reps)
            except Exception as error:  # noqa: BLE001 - e.g. out of shared memory: skip this config
                print(f"[skip] {cfg}: {type(error).__name__}: {str(error)[:200]}", flush=True)
                continue
            err = ((out.float() - reference.float()).norm() / reference.float().norm()).item()
            row = {"batch": batch, "ctx": ctx, **cfg, "bf16_us": t_bf16 * 1e3, "fp8_us": t_fp8 * 1e3,
                   "ratio": t_fp8 / t_bf16, "rel_err": err, "default": cfg is default}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        del case, kc, vc, k8, v8
        torch.cuda.empty_cache()
    set_decode_config(bmod, default)

    lines = [
        "| batch | context | bf16 µs | fp8 µs (default) | fp8/bf16 | best fp8 µs | fp8/bf16 | best config "
        "(tile, warps, stages, programs/SM) | rel err |",
        "|---:|---:|---:|---:|---:|---:|---:|---|---:|",
    ]
    for batch, ctx in SHAPES:
        mine = [r for r in rows if (r["batch"], r["ctx"]) == (batch, ctx)]
        if not mine:
            continue
        base = next(r for r in mine if r["default"])
        best = min(mine, key=lambda r: r["fp8_us"])
        lines.append(
            f"| {batch} | {ctx} | {base['bf16_us']:.1f} | {base['fp8_us']:.1f} | {base['ratio']:.2f} | "
            f"{best['fp8_us']:.1f} | {best['ratio']:.2f} | "
            f"{best['tile']}, {best['warps']}, {best['stages']}, {best['pps']} | {best['rel_err']:.1e} |"
        )
    # the one configuration best over all shapes together (summed time, measured on every shape)
    by_config: dict[tuple[int, ...], list[float]] = {}
    for r in rows:
        by_config.setdefault((r["tile"], r["warps"], r["stages"], r["pps"]), []).append(r["fp8_us"])
    complete = {key: sum(ts) for key, ts in by_config.items() if len(ts) == len(SHAPES)}
    if complete:
        key = min(complete, key=complete.__getitem__)
        lines.append(f"\nbest single fp8 config over all shapes: {key} ({complete[key]:.0f} µs summed)")
    write_report(Path(args.out), "fp8_decode", lines, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
