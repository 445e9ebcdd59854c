"""Does a float8 KV cache make paged attention faster? Our kernels on a bf16 cache and on the same values
cast to float8 (e4m3), timed side by side for each way of converting float8 for the products, and a
sweep of decode launch parameters for the default way.

    python3 framework/benchmarks/kernels/fp8_decode_check.py --out "$OUT"

Llama-3-8B shapes (32 query heads, 8 KV heads, d=128, block size 16). A float8 cache holds half the
bytes, so a decode kernel bound by KV reads would take half the time: ``fp8/bf16`` is the time ratio (0.5
ideal). Conversions (the backend's ``FP8_F16_DOTS`` and ``FP8_V_CVT_ASM``): ``bf16 dots`` converts each
tile to q's dtype; ``f16 dots`` converts to fp16 and rounds q to fp16; ``f16 dots, V by PTX`` (the
default) also converts V with an inline PTX instruction before its layout change. Each case is the
median of ``--reps`` CUDA-graph replays; outputs are checked against the bf16 cache's.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
# (batch, context, mixed): mixed draws each sequence's context uniformly in [64, context], as the offline
# workload's decode steps have them (about 480 sequences early in the run, 160 late)
SHAPES = [
    (64, 1024, False),
    (256, 1024, False),
    (64, 4096, False),
    (256, 4096, False),
    (480, 1408, True),
    (160, 1504, True),
]
PREFILL_SHAPE = (16, 1024)  # sequences x prompt length, causal, whole prompts
# name -> (FP8_F16_DOTS, FP8_V_CVT_ASM)
CONVERSIONS = {"bf16 dots": (False, False), "f16 dots": (True, False), "f16 dots, V by PTX": (True, True)}
DEFAULT = "f16 dots, V by PTX"
PREFILL_CONVERSIONS = ("bf16 dots", "f16 dots")  # prefill converts V as K (PTX measured slower there)


def set_conversion(bmod, name: str) -> None:
    bmod.FP8_F16_DOTS, bmod.FP8_V_CVT_ASM = CONVERSIONS[name]


def rel_err(out, reference) -> float:
    return ((out.float() - reference.float()).norm() / reference.float().norm()).item()


def decode_rows(be, bmod, reps: int) -> list[dict]:
    import torch
    from device_check import Case, decode_config, graph_time_ms, set_decode_config

    default = decode_config(bmod, fp8=True)
    bf16_default = decode_config(bmod)
    sweep = [
        {"tile": t, "warps": w, "stages": s, "pps": p, "heads_first": True}
        for t, w, s, p in itertools.product((64, 128), (4, 8), (1, 2, 3), (2, 4))
        if (t, w, s, p) != (default["tile"], default["warps"], default["stages"], default["pps"])
    ]
    rows = []
    for batch, ctx, mixed in SHAPES:
        case = Case(batch, ctx, seed=batch * 7 + ctx)
        if mixed:
            g = torch.Generator(device="cuda").manual_seed(batch)
            case.context_lens = torch.randint(
                64, ctx + 1, (batch,), device="cuda", generator=g, dtype=torch.int32
            )
        kc, vc, tables = case.paged_cache(16)
        k8, v8 = kc.to(torch.float8_e4m3fn), vc.to(torch.float8_e4m3fn)
        out = torch.empty_like(case.q)

        def decode(k, v, out=out, case=case, tables=tables):
            return lambda: be.decode(case.q, k, v, tables, case.context_lens, case.scale, out=out)

        t_bf16 = graph_time_ms(decode(kc, vc), reps)
        reference = out.clone()
        cases = [(name, default) for name in CONVERSIONS] + [(DEFAULT, cfg) for cfg in sweep]
        for name, cfg in cases:
            set_conversion(bmod, name)
            set_decode_config(bmod, cfg, fp8=True)
            try:
                t_fp8 = graph_time_ms(decode(k8, v8), reps)
            except Exception as error:  # noqa: BLE001 - e.g. out of shared memory: skip this config
                print(f"[skip] {name} {cfg}: {type(error).__name__}: {str(error)[:200]}", flush=True)
                continue
            row = {"batch": batch, "ctx": ctx, "mixed": mixed, "conversion": name, **cfg,
                   "bf16_us": t_bf16 * 1e3, "fp8_us": t_fp8 * 1e3, "ratio": t_fp8 / t_bf16,
                   "rel_err": rel_err(out, reference), "default": cfg is default}  # fmt: skip
            rows.append(row)
            print(json.dumps(row), flush=True)
        del case, kc, vc, k8, v8
        torch.cuda.empty_cache()
    set_decode_config(bmod, default, fp8=True)
    assert decode_config(bmod) == bf16_default  # the bf16 cache kept its own parameters throughout
    set_conversion(bmod, DEFAULT)
    return rows


def prefill_rows(be, bmod, reps: int) -> list[dict]:
    """Causal prefill of whole prompts from a bf16 and from a float8 cache of the same values."""
    import torch
    from device_check import HKV, HQ, D, graph_time_ms

    seqs, length = PREFILL_SHAPE
    total, bs = seqs * length, 16
    g = torch.Generator(device="cuda").manual_seed(length)
    q, k, v = (
        torch.randn((total, heads, D), device="cuda", dtype=torch.bfloat16, generator=g)
        for heads in (HQ, HKV, HKV)
    )
    cu = torch.arange(0, total + 1, length, dtype=torch.int32, device="cuda")
    ctx = torch.full((seqs,), length, dtype=torch.int32, device="cuda")
    perm = torch.randperm(total // bs, device="cuda")
    slots = (perm.view(seqs, length // bs)[:, :, None] * bs + torch.arange(bs, device="cuda")).reshape(-1)
    tables = perm.view(seqs, length // bs).to(torch.int32)
    out = torch.empty_like(q)
    caches = {}
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        kc = torch.empty((total // bs, bs, HKV, D), device="cuda", dtype=dtype)
        vc = torch.empty_like(kc)
        be.store_kv(k, v, kc, vc, slots)
        caches[dtype] = (kc, vc)

    def prefill(dtype):
        return lambda: be.prefill(q, *caches[dtype], cu, ctx, tables, D**-0.5, out=out)

    t_bf16 = graph_time_ms(prefill(torch.bfloat16), reps)
    reference = out.clone()
    rows = []
    for name in PREFILL_CONVERSIONS:
        set_conversion(bmod, name)
        t_fp8 = graph_time_ms(prefill(torch.float8_e4m3fn), reps)
        err = rel_err(out, reference)
        row = {"seqs": seqs, "len": length, "conversion": name, "bf16_us": t_bf16 * 1e3,
               "fp8_us": t_fp8 * 1e3, "ratio": t_fp8 / t_bf16, "rel_err": err}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    set_conversion(bmod, DEFAULT)
    return rows


def report(decode: list[dict], prefill: list[dict]) -> list[str]:
    names = list(CONVERSIONS)
    lines = [
        "Decode, default launch parameters (µs; fp8/bf16 in brackets), and the best sweep point of the "
        "default conversion:",
        "",
        f"| batch | context | bf16 µs | {' | '.join(names)} | best "
        "| best config (tile, warps, stages, programs/SM) | rel err |",
        "|---:|---:|---:|" + "---:|" * len(names) + "---:|---|---:|",
    ]
    for batch, ctx, mixed in SHAPES:
        mine = [r for r in decode if (r["batch"], r["ctx"]) == (batch, ctx)]
        if not mine:
            continue
        base = {r["conversion"]: r for r in mine if r["default"]}
        cells = [f"{base[n]['fp8_us']:.1f} ({base[n]['ratio']:.2f})" if n in base else "-" for n in names]
        best = min((r for r in mine if r["conversion"] == DEFAULT), key=lambda r: r["fp8_us"])
        lines.append(
            f"| {batch} | {f'64-{ctx}' if mixed else ctx} | {mine[0]['bf16_us']:.1f} | {' | '.join(cells)} | "
            f"{best['fp8_us']:.1f} ({best['ratio']:.2f}) | "
            f"{best['tile']}, {best['warps']}, {best['stages']}, {best['pps']} | {best['rel_err']:.1e} |"
        )
    # the one configuration best over all shapes together (summed time, measured on every shape)
    by_config: dict[tuple[int, ...], list[float]] = {}
    for r in decode:
        if r["conversion"] == DEFAULT:
            by_config.setdefault((r["tile"], r["warps"], r["stages"], r["pps"]), []).append(r["fp8_us"])
    complete = {key: sum(ts) for key, ts in by_config.items() if len(ts) == len(SHAPES)}
    if complete:
        key = min(complete, key=complete.__getitem__)
        lines.append(f"\nbest single config over all shapes: {key} ({complete[key]:.0f} µs summed)")
    if prefill:
        seqs, length = PREFILL_SHAPE
        lines += ["", f"Prefill, {seqs} x {length} tokens, causal (µs; fp8/bf16 in brackets):", ""]
        lines += ["| bf16 µs | " + " | ".join(PREFILL_CONVERSIONS) + " |"]
        lines += ["|---:|" + "---:|" * len(PREFILL_CONVERSIONS)]
        by_name = {r["conversion"]: r for r in prefill}
        cells = [f"{by_name[n]['fp8_us']:.1f} ({by_name[n]['ratio']:.2f})" for n in PREFILL_CONVERSIONS]
        lines.append(f"| {prefill[0]['bf16_us']:.1f} | " + " | ".join(cells) + " |")
    return lines


def main() -> int:
    sys.path.insert(0, str(Path(__file__).parent))
    from device_check import script_args, write_report

    args = script_args(reps=30)
    from pagedserve_plugins.triton_attention import backend as bmod

    be = bmod.TritonAttentionBackend()
    decode = decode_rows(be, bmod, args.reps)
    prefill = prefill_rows(be, bmod, args.reps)
    write_report(Path(args.out), "fp8_decode", report(decode, prefill), decode + prefill)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
