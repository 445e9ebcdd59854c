"""Compile the kernels for Hopper (sm_90) on a machine without a GPU and print ptxas's resource report.

    python framework/benchmarks/kernels/aot_check.py [--arch 90] [--sass]

Catches compile errors in the real (non-interpreted) code path and shows registers, spills and shared
memory per kernel variant, using the ``ptxas`` that ships inside the ``triton`` wheel. Must run without
``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

import triton
from pagedserve_plugins.triton_attention import kernels as K
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

PTXAS = Path(triton.__file__).parent / "backends/nvidia/bin/ptxas"


def _sig(fn, types: dict[str, str], constexprs: dict[str, object]) -> dict[str, str]:
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = types.get(name, "*bf16")
        else:
            sig[name] = types.get(name, "i32")
    return sig


def attention_types(dt: str, cache: str, **extra: str) -> dict[str, str]:
    """Argument types of an attention kernel: q and out of ``dt``, K/V caches of ``cache``."""
    return dict(
        qk_scale="fp32",
        q_ptr=f"*{dt}",
        out_ptr=f"*{dt}",
        k_cache_ptr=f"*{cache}",
        v_cache_ptr=f"*{cache}",
        block_tables_ptr="*i32",
        context_lens_ptr="*i32",
        **extra,
    )


def compile_one(fn, types, constexprs, num_warps, num_stages, arch, label, sass=False):
    sig = _sig(fn, types, constexprs)
    # as the JIT specialises them at run time: pointers and (multiple-of-16) strides divisible by 16
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(fn.arg_names)
        if n not in constexprs and (n.endswith("_ptr") or n.startswith("stride_"))
    }
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    try:
        ck = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 64),
            options={"num_warps": num_warps, "num_stages": num_stages},
        )
    except Exception as exc:
        print(f"FAIL {label}: {type(exc).__name__}: {str(exc)[:2000]}")
        return False
    ptx = ck.asm["ptx"]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "k.ptx"
        p.write_text(ptx)
        r = subprocess.run(
            [
                str(PTXAS),
                "-v",
                f"--gpu-name=sm_{arch}a" if arch == 90 else f"--gpu-name=sm_{arch}",
                str(p),
                "-o",
                str(Path(d) / "k.o"),
            ],
            capture_output=True,
            text=True,
        )
    info = " | ".join(
        line.split("ptxas info    : ")[-1]
        for line in r.stderr.splitlines()
        if "Used" in line or "spill" in line
    )
    print(f"ok   {label}: shared={ck.metadata.shared} {info}")
    if sass:
        print(ck.asm.get("sass", "")[:4000])
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--sass", action="store_true")
    ap.add_argument("--quick", action="store_true", help="one variant of each kernel (for CI)")
    args = ap.parse_args(argv)
    if getattr(K, "INTERPRETED", False):
        print("the kernels were built for the interpreter: run without TRITON_INTERPRET")
        return 2
    ok = True
    # (input dtype, cache dtype, the float8 cache's largest value: SATURATE)
    store_variants = [("bf16", "bf16", None), ("bf16", "fp8e4nv", 448.0), ("fp32", "fp32", None)]
    store_variants += [("fp16", "fp8e5", 57344.0)]
    for dt, cache, saturate in store_variants[:2] if args.quick else store_variants:
        types = dict(key_ptr=f"*{dt}", value_ptr=f"*{dt}", k_cache_ptr=f"*{cache}", v_cache_ptr=f"*{cache}")
        for bs in (16,) if args.quick else (16, 64, 1):
            ce = {"BLOCK_SIZE": bs, "HEAD_DIM": 128, "HEADS_PAD": 8, "SATURATE": saturate}
            label = f"store_kv {dt} -> {cache} bs={bs}"
            ok &= compile_one(K.store_kv_kernel, types, ce, 4, 2, args.arch, label)
    decode_variants = [
        ("bf16", "bf16", 64, 4, 3),
        ("bf16", "fp8e4nv", 64, 4, 2),
        ("bf16", "bf16", 128, 8, 2),
        ("bf16", "bf16", 32, 4, 4),
        ("fp32", "fp32", 32, 4, 3),
        ("fp16", "fp8e5", 64, 4, 2),
    ]
    for dt, cache, tile, warps, stages in decode_variants[:2] if args.quick else decode_variants:
        for direct in (True, False):
            types = attention_types(dt, cache, part_out_ptr="*fp32", part_lse_ptr="*fp32")
            ce = {
                "QPK": 4,
                "BLOCK_M": 16,
                "HEAD_DIM": 128,
                "TILE": tile,
                "BLOCK_SIZE": 16,
                "DIRECT": direct,
                "HEADS_FIRST": True,
                "IEEE": dt == "fp32",
                "UPCAST": False,
                "DOT_F16": cache.startswith("fp8"),
                "V_CVT_ASM": cache.startswith("fp8"),
            }
            ok &= compile_one(
                K.decode_partition_kernel,
                types,
                ce,
                warps,
                stages,
                args.arch,
                f"decode {dt} cache={cache} tile={tile} w={warps} s={stages} direct={direct}",
                args.sass,
            )
    types = {"part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "context_lens_ptr": "*i32", "out_ptr": "*bf16"}
    ok &= compile_one(
        K.decode_reduce_kernel,
        types,
        {"TILE": 64, "HEAD_DIM": 128, "SPLITS_PAD": 4},
        4,
        1,
        args.arch,
        "decode_reduce",
    )
    prefill_variants = [
        ("bf16", "bf16", 128, 128, 64, 4),
        ("bf16", "fp8e4nv", 128, 128, 64, 4),
        ("bf16", "bf16", 256, 64, 32, 4),
        ("fp32", "fp32", 64, 64, 32, 1),
        ("bf16", "bf16", 64, 128, 64, 3),
        ("fp16", "fp8e5", 128, 128, 64, 4),
    ]
    for dt, cache, d, rows, tile, qpk in prefill_variants[:2] if args.quick else prefill_variants:
        qpk_pad = 1 << (qpk - 1).bit_length()
        types = attention_types(dt, cache, cu_seqlens_q_ptr="*i32")
        ce = {
            "QPK": qpk,
            "QPK_PAD": qpk_pad,
            "BLOCK_Q": rows // qpk_pad,
            "HEAD_DIM": d,
            "TILE": tile,
            "BLOCK_SIZE": 16,
            "IEEE": dt == "fp32",
            "UPCAST": False,
            "DOT_F16": cache.startswith("fp8"),
        }
        ok &= compile_one(
            K.prefill_kernel,
            types,
            ce,
            8,
            2,
            args.arch,
            f"prefill {dt} cache={cache} d={d} rows={rows} qpk={qpk}",
        )
    print("ALL OK" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
