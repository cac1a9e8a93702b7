"""Triton kernels of routed attention. Imported lazily by :mod:`zoo.ops.routed_triton` at first use, because
``@triton.jit`` decides at definition time whether kernels run compiled or under ``TRITON_INTERPRET=1``.

Layout: q, k, v, o ``(B, nh, H, W, d)`` with arbitrary strides; a region of ``RH x RW`` tokens is cut into
tiles of ``BLOCK_M`` (queries) / ``BLOCK_N`` (keys) tokens numbered row-major inside the region.
Softmax runs in base 2: ``qk_scale = scale * log2(e)``; ``lse`` is stored in base 2, ``+inf`` for query rows
whose keys are all masked (their probabilities, output and gradients are then exactly 0).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tile_coords(region, tile, n_rw, RH: tl.constexpr, RW: tl.constexpr, BLOCK: tl.constexpr):
    """Rows, cols and in-region mask of the ``BLOCK`` tokens of tile ``tile`` of region ``region``."""
    t = tile * BLOCK + tl.arange(0, BLOCK)
    inside = t < RH * RW
    rows = (region // n_rw) * RH + t // RW
    cols = (region % n_rw) * RW + t % RW
    return rows, cols, inside


@triton.jit
def _routed_fwd_kernel(
    Q, K, V, IDX, OUT, LSE,
    sqb, sqh, sqy, sqx, sqd,
    skb, skh, sky, skx, skd,
    svb, svh, svy, svx, svd,
    sob, soh, soy, sox, sod,
    sib, sih, sir, sit,
    slb, slh, sly, slx,
    nh, n_rw, topk, d_qk, d_v, valid_h, valid_w, qk_scale,
    RH: tl.constexpr, RW: tl.constexpr, N_MT: tl.constexpr, N_NT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    region = pid // N_MT
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    rows, cols, q_inside = _tile_coords(region, pid % N_MT, n_rw, RH, RW, BLOCK_M)
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sqy + cols[:, None] * sqx + dqk[None, :] * sqd
    q = tl.load(q_ptrs, mask=q_inside[:, None] & (dqk[None, :] < d_qk), other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    idx_base = IDX + b * sib + h * sih + region * sir
    for slot in range(0, topk):
        key_region = tl.load(idx_base + slot * sit)
        for nt in range(0, N_NT):
            k_rows, k_cols, k_inside = _tile_coords(key_region, nt, n_rw, RH, RW, BLOCK_N)
            k_ptrs = K + b * skb + h * skh + k_rows[None, :] * sky + k_cols[None, :] * skx + dqk[:, None] * skd
            kt = tl.load(k_ptrs, mask=k_inside[None, :] & (dqk[:, None] < d_qk), other=0.0)  # (D, BLOCK_N)
            s = tl.dot(q, kt, input_precision=PRECISION) * qk_scale
            key_ok = k_inside & (k_rows < valid_h) & (k_cols < valid_w)
            s = tl.where(key_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)  # avoids -inf - -inf while all keys are masked
            p = tl.exp2(s - m_sub[:, None])
            alpha = tl.exp2(m_i - m_sub)
            l_i = l_i * alpha + tl.sum(p, 1)
            v_ptrs = V + b * svb + h * svh + k_rows[:, None] * svy + k_cols[:, None] * svx + dv[None, :] * svd
            v = tl.load(v_ptrs, mask=k_inside[:, None] & (dv[None, :] < d_v), other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = OUT + b * sob + h * soh + rows[:, None] * soy + cols[:, None] * sox + dv[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=q_inside[:, None] & (dv[None, :] < d_v))
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + b * slb + h * slh + rows * sly + cols * slx, lse, mask=q_inside)


@triton.jit
def _routed_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, IDX, DQ,
    sqb, sqh, sqy, sqx, sqd,
    skb, skh, sky, skx, skd,
    svb, svh, svy, svx, svd,
    sob, soh, soy, sox, sod,
    sgb, sgh, sgy, sgx, sgd,
    sib, sih, sir, sit,
    slb, slh, sly, slx,
    nh, n_rw, topk, d_qk, d_v, valid_h, valid_w, qk_scale, scale,
    RH: tl.constexpr, RW: tl.constexpr, N_MT: tl.constexpr, N_NT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """dq of one query tile. DO strides ``so*``, DQ strides ``sg*``, LSE and DELTA (same layout) ``sl*``."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    region = pid // N_MT
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    rows, cols, q_inside = _tile_coords(region, pid % N_MT, n_rw, RH, RW, BLOCK_M)
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sqy + cols[:, None] * sqx + dqk[None, :] * sqd
    q = tl.load(q_ptrs, mask=q_inside[:, None] & (dqk[None, :] < d_qk), other=0.0)
    do_ptrs = DO + b * sob + h * soh + rows[:, None] * soy + cols[:, None] * sox + dv[None, :] * sod
    do = tl.load(do_ptrs, mask=q_inside[:, None] & (dv[None, :] < d_v), other=0.0)
    row_off = b * slb + h * slh + rows * sly + cols * slx
    lse = tl.load(LSE + row_off, mask=q_inside, other=float("inf"))
    delta = tl.load(DELTA + row_off, mask=q_inside, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    idx_base = IDX + b * sib + h * sih + region * sir
    for slot in range(0, topk):
        key_region = tl.load(idx_base + slot * sit)
        for nt in range(0, N_NT):
            k_rows, k_cols, k_inside = _tile_coords(key_region, nt, n_rw, RH, RW, BLOCK_N)
            k_ptrs = K + b * skb + h * skh + k_rows[:, None] * sky + k_cols[:, None] * skx + dqk[None, :] * skd
            k = tl.load(k_ptrs, mask=k_inside[:, None] & (dqk[None, :] < d_qk), other=0.0)  # (BLOCK_N, D)
            vt_ptrs = V + b * svb + h * svh + k_rows[None, :] * svy + k_cols[None, :] * svx + dv[:, None] * svd
            vt = tl.load(vt_ptrs, mask=k_inside[None, :] & (dv[:, None] < d_v), other=0.0)  # (DV, BLOCK_N)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            key_ok = k_inside & (k_rows < valid_h) & (k_cols < valid_w)
            p = tl.where(key_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, vt, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq_ptrs = DQ + b * sgb + h * sgh + rows[:, None] * sgy + cols[:, None] * sgx + dqk[None, :] * sgd
    tl.store(dq_ptrs, (dq * scale).to(DQ.dtype.element_ty), mask=q_inside[:, None] & (dqk[None, :] < d_qk))


@triton.jit
def _routed_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, QLIST, OFFSETS, DK, DV,
    sqb, sqh, sqy, sqx, sqd,
    skb, skh, sky, skx, skd,
    svb, svh, svy, svx, svd,
    sob, soh, soy, sox, sod,
    sgb, sgh, sgy, sgx, sgd,
    sub, suh, suy, sux, sud,
    slb, slh, sly, slx,
    nh, idx_heads, n_regions, list_len, n_rw, d_qk, d_v, valid_h, valid_w, qk_scale, scale,
    RH: tl.constexpr, RW: tl.constexpr, N_MT: tl.constexpr, N_NT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    """dk, dv of one key tile, summed over the query regions that routed to its region (inverted lists).

    ``QLIST[g, OFFSETS[g, s] : OFFSETS[g, s + 1]]`` are those query regions in ascending order, ``g`` being the
    routing group (batch, or batch x head for per-head routing): a fixed order, no atomics, deterministic.
    Strides: DO ``so*``, DK ``sg*``, DV ``su*``, LSE and DELTA ``sl*``.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    key_region = pid // N_NT
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    group = b * idx_heads + h % idx_heads
    k_rows, k_cols, k_inside = _tile_coords(key_region, pid % N_NT, n_rw, RH, RW, BLOCK_N)
    key_ok = k_inside & (k_rows < valid_h) & (k_cols < valid_w)
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    k_ptrs = K + b * skb + h * skh + k_rows[:, None] * sky + k_cols[:, None] * skx + dqk[None, :] * skd
    k = tl.load(k_ptrs, mask=k_inside[:, None] & (dqk[None, :] < d_qk), other=0.0)  # (BLOCK_N, D)
    v_ptrs = V + b * svb + h * svh + k_rows[:, None] * svy + k_cols[:, None] * svx + dv[None, :] * svd
    v = tl.load(v_ptrs, mask=k_inside[:, None] & (dv[None, :] < d_v), other=0.0)  # (BLOCK_N, DV)

    dk = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
    dvacc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    start = tl.load(OFFSETS + group * (n_regions + 1) + key_region)
    end = tl.load(OFFSETS + group * (n_regions + 1) + key_region + 1)
    for i in range(start, end):
        q_region = tl.load(QLIST + group * list_len + i)
        for mt in range(0, N_MT):
            rows, cols, q_inside = _tile_coords(q_region, mt, n_rw, RH, RW, BLOCK_M)
            q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sqy + cols[:, None] * sqx + dqk[None, :] * sqd
            q = tl.load(q_ptrs, mask=q_inside[:, None] & (dqk[None, :] < d_qk), other=0.0)  # (BLOCK_M, D)
            do_ptrs = DO + b * sob + h * soh + rows[:, None] * soy + cols[:, None] * sox + dv[None, :] * sod
            do = tl.load(do_ptrs, mask=q_inside[:, None] & (dv[None, :] < d_v), other=0.0)
            row_off = b * slb + h * slh + rows * sly + cols * slx
            lse = tl.load(LSE + row_off, mask=q_inside, other=float("inf"))
            delta = tl.load(DELTA + row_off, mask=q_inside, other=0.0)
            # transposed scores (keys x queries) so that dk, dv accumulate without transposing p
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale
            pt = tl.where(key_ok[:, None], tl.exp2(st - lse[None, :]), 0.0)
            dvacc += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    dk_ptrs = DK + b * sgb + h * sgh + k_rows[:, None] * sgy + k_cols[:, None] * sgx + dqk[None, :] * sgd
    tl.store(dk_ptrs, (dk * scale).to(DK.dtype.element_ty), mask=k_inside[:, None] & (dqk[None, :] < d_qk))
    dv_ptrs = DV + b * sub + h * suh + k_rows[:, None] * suy + k_cols[:, None] * sux + dv[None, :] * sud
    tl.store(dv_ptrs, dvacc.to(DV.dtype.element_ty), mask=k_inside[:, None] & (dv[None, :] < d_v))


# the constexprs that change performance: the autotune key (zoo.ops._triton.launcher; ZOO_OPS_AUTOTUNE)
TUNE_KEY = ("RH", "RW", "BLOCK_M", "BLOCK_DQK", "BLOCK_DV", "PRECISION")
routed_fwd = _routed_fwd_kernel
routed_bwd_dq = _routed_bwd_dq_kernel
routed_bwd_dkdv = _routed_bwd_dkdv_kernel

# How these kernels were defined (``triton.jit`` reads TRITON_INTERPRET once, at decoration): a plain bool the
# dispatch reads, so that torch.compile traces the check without touching a Triton function object.
INTERPRETED: bool = type(_routed_fwd_kernel).__name__ == "InterpretedFunction"
