"""Triton-language kernels for the paged KV cache: K/V store, split-K decode, causal varlen prefill.

Cache layout (per layer, one tensor each for K and V): ``[num_blocks, block_size, num_kv_heads, head_dim]``
with a unit stride on ``head_dim``; token ``t`` of a sequence lives in page ``block_table[t // block_size]``
at row ``t % block_size``. The kernels look the page up once per token of a KV tile, so a tile may span
several pages and any block size works with any tile size.

GQA: one program serves every query head of one KV head ("group"), packing the group's heads (and, for
prefill, several query tokens) into the rows of one matrix tile, so each K/V tile is read from memory
once per group and never copied or repeated.

Softmax is computed online in base 2 (``exp2``), with the softmax scale folded into ``log2(e)``.

Per-layer options (``SLIDING``, ``SOFTCAP``, compile-time switches so layers without them run the plain
code): a sliding window of ``window`` keys ends each query's key range at its own position, and tiles before
the earliest key any row of a program needs are never visited; keys below that inside a visited tile are
masked on load, because their blocks may have been freed (block-table entry -1). Soft-capping turns the
scaled score ``s`` into ``cap * tanh(s / cap)``: ``qk_scale`` is then ``scale / cap`` and ``cap_log2e`` is
``cap * log2(e)``.

The caches may be float8 (scale 1.0): the store kernel clamps and casts, the attention kernels convert each
K/V tile to ``q``'s dtype as it is loaded, so the matrix products run as for a cache of ``q``'s dtype. With
``DOT_F16`` they convert to fp16 instead and round ``q`` (times the softmax scale) to fp16: float8 pairs
become fp16 pairs in one exact instruction, while bf16 takes several per value, which made a bf16-model's
float8 decode slower than its bf16 decode (``fp8_decode_check.py``); ``V_CVT_ASM`` (decode) picks how V
converts (see ``_v_operand``).

Whether these kernels run compiled or in Triton's CPU interpreter is fixed when this module is imported
(``TRITON_INTERPRET``); :data:`INTERPRETED` records which, and the backend re-imports the module when the
setting has changed since.
"""

from __future__ import annotations

import triton
import triton.language as tl

INTERPRETED: bool = bool(triton.knobs.runtime.interpret)

# Four float8 values (the bytes of one 32-bit register, lowest first) to four fp16 values in two
# registers; whole registers in and out, so the compiler need not split and re-pack bytes around it.
_E4M3_TO_F16X4: tl.constexpr = tl.constexpr(
    "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }"
)
_E5M2_TO_F16X4: tl.constexpr = tl.constexpr(
    "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; cvt.rn.f16x2.e5m2x2 $0, lo; cvt.rn.f16x2.e5m2x2 $1, hi; }"
)


@triton.jit
def store_kv_kernel(
    key_ptr,
    value_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_kc_blk,
    stride_kc_off,
    stride_kc_head,
    stride_vc_blk,
    stride_vc_off,
    stride_vc_head,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    SATURATE: tl.constexpr,
):
    """One program per new token: copy its K and V rows (all KV heads) into the token's cache slot.

    ``SATURATE`` (``None`` or the cache type's largest finite value): clamp before the cast, so values out
    of a float8 cache's range are stored as its largest value instead of NaN."""
    n = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + n).to(tl.int64)
    keep = slot >= 0
    slot = tl.maximum(slot, 0)
    page = slot // BLOCK_SIZE
    row = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, HEAD_DIM)
    mask = (heads[:, None] < num_kv_heads) & keep
    k = tl.load(key_ptr + n * stride_kn + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(value_ptr + n * stride_vn + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    if SATURATE is not None:
        k = tl.clamp(k.to(tl.float32), -SATURATE, SATURATE, propagate_nan=tl.PropagateNan.ALL)
        v = tl.clamp(v.to(tl.float32), -SATURATE, SATURATE, propagate_nan=tl.PropagateNan.ALL)
    k_dst = k_cache_ptr + page * stride_kc_blk + row * stride_kc_off + heads[:, None] * stride_kc_head
    v_dst = v_cache_ptr + page * stride_vc_blk + row * stride_vc_off + heads[:, None] * stride_vc_head
    tl.store(k_dst + dims[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(v_dst + dims[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _kv_tile(
    t,
    ctx,
    block_table_row_ptr,
    k_head_ptr,
    v_head_ptr,
    stride_kc_blk,
    stride_kc_off,
    stride_vc_blk,
    stride_vc_off,
    TILE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """KV tile ``t`` of one sequence and one KV head: its token positions, which of them exist (``< ctx``),
    and pointers ``[TILE, HEAD_DIM]`` to their K and V rows (page looked up per token)."""
    tok = t * TILE + tl.arange(0, TILE)
    tok_ok = tok < ctx
    page = tl.load(block_table_row_ptr + tok // BLOCK_SIZE, mask=tok_ok, other=0).to(tl.int64)
    row = (tok % BLOCK_SIZE).to(tl.int64)
    dims = tl.arange(0, HEAD_DIM)
    k_ptrs = k_head_ptr + (page * stride_kc_blk + row * stride_kc_off)[:, None] + dims[None, :]
    v_ptrs = v_head_ptr + (page * stride_vc_blk + row * stride_vc_off)[:, None] + dims[None, :]
    return tok, tok_ok, k_ptrs, v_ptrs


@triton.jit
def _query_operand(q, qk_scale, DOT_F16: tl.constexpr):
    """``q`` and the scale still to apply to ``q @ k^T``: with ``DOT_F16``, q times the scale rounded to
    fp16 (scaled first, so q's range cannot overflow fp16) and 1.0; otherwise both unchanged."""
    if DOT_F16:
        q = (q.to(tl.float32) * qk_scale).to(tl.float16)
        qk_scale = 1.0
    return q, qk_scale


@triton.jit
def _logits(qk, qk_scale, cap_log2e, SOFTCAP: tl.constexpr):
    """Raw ``q @ k^T`` to base-2 softmax logits, soft-capped if ``SOFTCAP`` (``tanh(x) = 2 sigmoid(2x) - 1``:
    the interpreter has no ``tanh``, and this form saturates cleanly to +-1 for large ``|x|``)."""
    x = qk * qk_scale
    if SOFTCAP:
        x = (2.0 * tl.sigmoid(2.0 * x) - 1.0) * cap_log2e
    return x


@triton.jit
def _v_operand(v, dtype: tl.constexpr, CVT_ASM: tl.constexpr):
    """A loaded V tile converted to ``dtype`` for ``p @ v``.

    ``CVT_ASM`` (a float8 tile to fp16, compiled kernels only): convert with an opaque PTX instruction.
    Triton would otherwise keep the float8 tile in shared memory and convert it after reading it back in
    the MMA operand layout, which for V (transposed for the product) takes one load per byte; converted
    before the layout change, the tile is read back with ``ldmatrix.trans`` as a 16-bit one is."""
    if CVT_ASM:
        cvt: tl.constexpr = _E5M2_TO_F16X4 if v.dtype.is_fp8e5() else _E4M3_TO_F16X4
        bits = v.to(tl.int8, bitcast=True)
        out = tl.inline_asm_elementwise(cvt, "=r,=r,r", [bits], dtype=tl.float16, is_pure=False, pack=4)
    else:
        out = v.to(dtype)
    return out


@triton.jit
def _mm(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` accumulated in fp32; ``IEEE`` keeps fp32 operands exact (no tf32), ``UPCAST`` feeds the
    multiply fp32 copies (the CPU interpreter cannot multiply bf16 matrices)."""
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        c = tl.dot(a, b, input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _softmax_accumulate(
    qk, v, m_i, l_i, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr, MAY_BE_EMPTY: tl.constexpr
):
    """One tile of online softmax (base 2): rescale the running max ``m_i``, sum ``l_i`` and output
    ``acc`` to the tile's new max, then add the tile's ``softmax(qk) @ v``.

    ``MAY_BE_EMPTY``: a row may have seen no visible key yet (a sliding window starts past this tile for
    it), so its max is still -inf; subtract 0 there instead, or ``-inf - -inf`` would make it NaN."""
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    m_sub = m_new
    if MAY_BE_EMPTY:
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_sub[:, None])
    alpha = tl.math.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, IEEE, UPCAST)
    return m_new, l_i, acc


@triton.jit
def _decode_tiles(ctx, window, TILE: tl.constexpr, SLIDING: tl.constexpr):
    """The first key a decode query reads, and the range ``[t_first, n_tiles)`` of KV tiles that hold it
    and the keys after it (the partition and the reduction must agree on it)."""
    first_key = ctx * 0
    if SLIDING:
        first_key = tl.maximum(ctx - window, 0)
    return first_key, first_key // TILE, tl.cdiv(ctx, TILE)


@triton.jit
def decode_partition_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    context_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    cap_log2e,
    window,
    stride_qb,
    stride_qh,
    stride_kc_blk,
    stride_kc_off,
    stride_kc_head,
    stride_vc_blk,
    stride_vc_off,
    stride_vc_head,
    stride_bt,
    stride_ob,
    stride_oh,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    num_splits,
    QPK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    DIRECT: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_F16: tl.constexpr,
    V_CVT_ASM: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Grid ``(num_kv_heads, batch, num_splits)`` (``(batch, num_kv_heads, ...)`` unless ``HEADS_FIRST``):
    attention of one decode query (all heads of a KV group) over one contiguous range of KV tiles of its
    sequence.

    With KV heads varying fastest over the grid, the programs reading the other heads of the same cache
    pages (which share each token's row in memory) run at the same time.

    Each sequence's tiles are cut into ``num_splits`` near-equal ranges, so work per program follows the
    sequence's own length. With ``DIRECT`` (one split) the normalised result goes straight to ``out``;
    otherwise the partial result and its base-2 log-sum-exp go to the scratch buffers for the reduction.
    """
    if HEADS_FIRST:
        g = tl.program_id(0)
        b = tl.program_id(1)
    else:
        b = tl.program_id(0)
        g = tl.program_id(1)
    s = tl.program_id(2)
    ctx = tl.load(context_lens_ptr + b)
    first_key, t_first, n_tiles = _decode_tiles(ctx, window, TILE, SLIDING)
    per_split = tl.maximum(tl.cdiv(n_tiles - t_first, num_splits), 1)
    t_begin = t_first + s * per_split
    t_end = tl.minimum(t_begin + per_split, n_tiles)

    rows = tl.arange(0, BLOCK_M)
    row_ok = rows < QPK
    heads = g * QPK + rows
    dims = tl.arange(0, HEAD_DIM)
    q = tl.load(
        q_ptr + b.to(tl.int64) * stride_qb + heads[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    q, qk_scale = _query_operand(q, qk_scale, DOT_F16)
    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + g.to(tl.int64) * stride_kc_head
    v_head = v_cache_ptr + g.to(tl.int64) * stride_vc_head

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    for t in range(t_begin, t_end):
        tok, tok_ok, k_ptrs, v_ptrs = _kv_tile(
            t, ctx, bt_row, k_head, v_head, stride_kc_blk, stride_kc_off, stride_vc_blk, stride_vc_off,
            TILE, BLOCK_SIZE, HEAD_DIM,
        )  # fmt: skip
        if SLIDING:
            tok_ok = tok_ok & (tok >= first_key)
        k = tl.load(k_ptrs, mask=tok_ok[:, None], other=0.0).to(q.dtype)
        qk = _mm(q, tl.trans(k), IEEE, UPCAST)
        qk = tl.where(tok_ok[None, :], _logits(qk, qk_scale, cap_log2e, SOFTCAP), float("-inf"))
        v = _v_operand(tl.load(v_ptrs, mask=tok_ok[:, None], other=0.0), q.dtype, V_CVT_ASM)
        m_i, l_i, acc = _softmax_accumulate(qk, v, m_i, l_i, acc, IEEE, UPCAST, False)

    has_work = t_begin < t_end
    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    result = acc / l_safe[:, None]
    if DIRECT:
        o_ptrs = out_ptr + b.to(tl.int64) * stride_ob + heads[:, None] * stride_oh + dims[None, :]
        tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        p_ptrs = (
            part_out_ptr
            + b.to(tl.int64) * stride_pb
            + heads[:, None] * stride_ph
            + s * stride_ps
            + dims[None, :]
        )
        tl.store(p_ptrs, result, mask=row_ok[:, None] & has_work)
        lse = m_i + tl.math.log2(l_safe)
        tl.store(part_lse_ptr + b * stride_lb + heads * stride_lh + s, lse, mask=row_ok & has_work)


@triton.jit
def decode_reduce_kernel(
    part_out_ptr,
    part_lse_ptr,
    context_lens_ptr,
    out_ptr,
    window,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    num_splits,
    TILE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
    SLIDING: tl.constexpr,
):
    """Grid ``(batch, num_q_heads)``: merge the per-split partial results of one head by their weights."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + b)
    _, t_first, n_tiles = _decode_tiles(ctx, window, TILE, SLIDING)
    per_split = tl.maximum(tl.cdiv(n_tiles - t_first, num_splits), 1)
    n_used = tl.cdiv(n_tiles - t_first, per_split)
    splits = tl.arange(0, SPLITS_PAD)
    used = splits < n_used
    dims = tl.arange(0, HEAD_DIM)
    lse = tl.load(part_lse_ptr + b * stride_lb + h * stride_lh + splits, mask=used, other=float("-inf"))
    top = tl.max(lse, 0)
    top = tl.where(n_used > 0, top, 0.0)
    w = tl.where(used, tl.math.exp2(lse - top), 0.0)
    denom = tl.sum(w, 0)
    denom = tl.where(denom > 0.0, denom, 1.0)
    parts = tl.load(
        part_out_ptr
        + b.to(tl.int64) * stride_pb
        + h * stride_ph
        + splits[:, None] * stride_ps
        + dims[None, :],
        mask=used[:, None],
        other=0.0,
    )
    result = tl.sum(parts * w[:, None], 0) / denom
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + dims, result.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill_masked_tile(
    t,
    q,
    q_pos,
    first_key,
    ctx,
    bt_row,
    k_head,
    v_head,
    stride_kc_blk,
    stride_kc_off,
    stride_vc_blk,
    stride_vc_off,
    qk_scale,
    cap_log2e,
    window,
    m_i,
    l_i,
    acc,
    TILE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """One KV tile that some rows see only in part: causal mask, window mask, and no load of a key before
    ``first_key`` (its block may be gone)."""
    tok, tok_ok, k_ptrs, v_ptrs = _kv_tile(
        t, ctx, bt_row, k_head, v_head, stride_kc_blk, stride_kc_off, stride_vc_blk, stride_vc_off,
        TILE, BLOCK_SIZE, HEAD_DIM,
    )  # fmt: skip
    if SLIDING:
        tok_ok = tok_ok & (tok >= first_key)
    k = tl.load(k_ptrs, mask=tok_ok[:, None], other=0.0).to(q.dtype)
    qk = _mm(q, tl.trans(k), IEEE, UPCAST)
    visible = (tok[None, :] <= q_pos[:, None]) & tok_ok[None, :]
    if SLIDING:
        visible = visible & (tok[None, :] > q_pos[:, None] - window)
    qk = tl.where(visible, _logits(qk, qk_scale, cap_log2e, SOFTCAP), float("-inf"))
    v = tl.load(v_ptrs, mask=tok_ok[:, None], other=0.0).to(q.dtype)
    return _softmax_accumulate(qk, v, m_i, l_i, acc, IEEE, UPCAST, SLIDING)


@triton.jit
def prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    cu_seqlens_q_ptr,
    context_lens_ptr,
    out_ptr,
    qk_scale,
    cap_log2e,
    window,
    num_seqs,
    stride_qt,
    stride_qh,
    stride_kc_blk,
    stride_kc_off,
    stride_kc_head,
    stride_vc_blk,
    stride_vc_off,
    stride_vc_head,
    stride_bt,
    stride_ot,
    stride_oh,
    QPK: tl.constexpr,
    QPK_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    TILE: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_F16: tl.constexpr,
    SLIDING: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Grid ``(T // BLOCK_Q + num_seqs, num_kv_heads)``: causal attention for ``BLOCK_Q`` query tokens of one
    sequence times the ``QPK`` query heads of one KV group (``BLOCK_Q * QPK_PAD`` rows).

    Sequence ``b``'s query tiles are numbered from ``cu_seqlens_q[b] // BLOCK_Q + b``; these ranges never
    overlap and their total stays under the grid size, so no host-side tile map (and no sync) is needed;
    each program finds its sequence by bisection and programs past a sequence's last tile do nothing.
    Query ``i`` of a sequence with ``q_len`` new tokens and ``ctx`` tokens in all sits at position
    ``ctx - q_len + i`` and sees keys ``0..position`` (the last ``window`` of them if ``SLIDING``), all read
    through the block table.

    KV tiles run in three ranges: masked ones before the keys that every row of the tile sees (only with a
    window), those keys unmasked, then masked ones up to the last row's position.
    """
    BLOCK_M: tl.constexpr = BLOCK_Q * QPK_PAD
    pid = tl.program_id(0)
    g = tl.program_id(1)

    lo = pid * 0
    hi = pid * 0 + num_seqs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        first = tl.load(cu_seqlens_q_ptr + mid) // BLOCK_Q + mid
        lo = tl.where(first <= pid, mid, lo)
        hi = tl.where(first <= pid, hi, mid)
    b = lo
    q_start = tl.load(cu_seqlens_q_ptr + b)
    q_len = tl.load(cu_seqlens_q_ptr + b + 1) - q_start
    q_tile = pid - (q_start // BLOCK_Q + b)
    ctx = tl.load(context_lens_ptr + b)
    prefix = ctx - q_len

    rows = tl.arange(0, BLOCK_M)
    q_idx = q_tile * BLOCK_Q + rows // QPK_PAD
    head_in_group = rows % QPK_PAD
    row_ok = (q_idx < q_len) & (head_in_group < QPK)
    heads = g * QPK + head_in_group
    q_pos = prefix + q_idx
    dims = tl.arange(0, HEAD_DIM)
    q_rows = (q_start + q_idx).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + heads[:, None] * stride_qh + dims[None, :],
        mask=row_ok[:, None],
        other=0.0,
    )
    q, qk_scale = _query_operand(q, qk_scale, DOT_F16)

    tile_lo = q_tile * BLOCK_Q
    tile_hi = tl.minimum(tile_lo + BLOCK_Q, q_len)
    has_rows = tile_lo < q_len
    # keys up to the tile's first query position are visible to every row: no causal mask there
    free_hi = tl.where(has_rows, (prefix + tile_lo + 1) // TILE, 0)
    n_all = tl.where(has_rows, tl.cdiv(prefix + tile_hi, TILE), 0)
    first_key = prefix * 0
    t_first = first_key
    free_lo = first_key
    if SLIDING:
        # the first row's window starts lowest; the last row's window starts highest, and keys from
        # there on (up to the first row's position) are visible to every row
        first_key = tl.maximum(prefix + tile_lo - window + 1, 0)
        t_first = tl.minimum(first_key // TILE, n_all)
        free_lo = tl.maximum(tl.cdiv(tl.maximum(prefix + tile_hi - window, 0), TILE), t_first)
        has_free = free_lo < free_hi  # else every tile from t_first on is masked
        free_lo = tl.where(has_free, free_lo, n_all)
        free_hi = tl.where(has_free, free_hi, n_all)

    bt_row = block_tables_ptr + b.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + g.to(tl.int64) * stride_kc_head
    v_head = v_cache_ptr + g.to(tl.int64) * stride_vc_head
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    for t in range(t_first, free_lo):
        m_i, l_i, acc = _prefill_masked_tile(
            t, q, q_pos, first_key, ctx, bt_row, k_head, v_head, stride_kc_blk, stride_kc_off,
            stride_vc_blk, stride_vc_off, qk_scale, cap_log2e, window, m_i, l_i, acc, TILE, BLOCK_SIZE,
            HEAD_DIM, IEEE, UPCAST, SLIDING, SOFTCAP,
        )  # fmt: skip

    for t in range(free_lo, free_hi):
        tok, tok_ok, k_ptrs, v_ptrs = _kv_tile(
            t, ctx, bt_row, k_head, v_head, stride_kc_blk, stride_kc_off, stride_vc_blk, stride_vc_off,
            TILE, BLOCK_SIZE, HEAD_DIM,
        )  # fmt: skip
        k = tl.load(k_ptrs).to(q.dtype)
        qk = _mm(q, tl.trans(k), IEEE, UPCAST)
        v = tl.load(v_ptrs).to(q.dtype)
        qk = _logits(qk, qk_scale, cap_log2e, SOFTCAP)
        m_i, l_i, acc = _softmax_accumulate(qk, v, m_i, l_i, acc, IEEE, UPCAST, False)

    for t in range(tl.maximum(free_hi, t_first), n_all):
        m_i, l_i, acc = _prefill_masked_tile(
            t, q, q_pos, first_key, ctx, bt_row, k_head, v_head, stride_kc_blk, stride_kc_off,
            stride_vc_blk, stride_vc_off, qk_scale, cap_log2e, window, m_i, l_i, acc, TILE, BLOCK_SIZE,
            HEAD_DIM, IEEE, UPCAST, SLIDING, SOFTCAP,
        )  # fmt: skip

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    result = acc / l_safe[:, None]
    o_ptrs = out_ptr + q_rows[:, None] * stride_ot + heads[:, None] * stride_oh + dims[None, :]
    tl.store(o_ptrs, result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
