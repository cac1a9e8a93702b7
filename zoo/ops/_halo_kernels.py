"""Triton kernels of halo attention. Imported lazily by :mod:`zoo.ops.halo_triton` (``TRITON_INTERPRET`` is read
when ``@triton.jit`` runs).

Geometry: key map ``H x W`` cut into ``B_SIZE`` blocks; query map ``Hq x Wq`` into ``BQ`` blocks (``BQ = B_SIZE /
query_stride``); query block ``(i, j)`` attends to the ``WIN x WIN`` window of keys at rows ``i*B_SIZE - HALO +
ky``, cols ``j*B_SIZE - HALO + kx``. Keys outside the map are zeros (timm's padding) or masked (``MASK_PAD``).
Logits (base 2): ``(q.k) * qk_coef + (RH[q, ky - qy + WIN - 1] + RW[q, kx - qx + WIN - 1]) * rel_coef``, where
``RH = q @ height_rel^T`` and ``RW = q @ width_rel^T`` come precomputed ``(B, nh, Hq, Wq, 2*WIN - 1)``.
Keys are processed one window row at a time (``BLOCK_KX >= WIN`` columns): the row's height logit is one value
per query and the width logits are the same for every row, so both are cheap, and their gradients reduce
without atomics.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _query_block(qblock, n_bw, Hq, Wq, BQ: tl.constexpr, BLOCK_M: tl.constexpr):
    """Local (qy, qx), global (row, col) and validity of the queries of query block ``qblock``."""
    m = tl.arange(0, BLOCK_M)
    qy = m // BQ
    qx = m % BQ
    rows = (qblock // n_bw) * BQ + qy
    cols = (qblock % n_bw) * BQ + qx
    ok = (m < BQ * BQ) & (rows < Hq) & (cols < Wq)
    return qy, qx, rows, cols, ok


@triton.jit
def _key_block(kblock, n_bw, H, W, B_SIZE: tl.constexpr, BLOCK_B: tl.constexpr):
    """Block coordinates, global (row, col) and validity of the keys of key block ``kblock``, laid out on a
    ``BLOCK_B x BLOCK_B`` grid (key ``n`` at block row ``n // BLOCK_B``, column ``n % BLOCK_B``)."""
    n = tl.arange(0, BLOCK_B * BLOCK_B)
    kby = kblock // n_bw
    kbx = kblock % n_bw
    y = kby * B_SIZE + n // BLOCK_B
    x = kbx * B_SIZE + n % BLOCK_B
    key_ok = (n // BLOCK_B < B_SIZE) & (n % BLOCK_B < B_SIZE) & (y < H) & (x < W)
    return kby, kbx, y, x, key_ok


@triton.jit
def _halo_fwd_kernel(
    Q, K, V, RH, RW, OUT, LSE,
    sqb, sqh, sqy, sqx, sqd,
    skb, skh, sky, skx, skd,
    svb, svh, svy, svx, svd,
    srb, srh, sry, srx, srd,
    sob, soh, soy, sox, sod,
    slb, slh, sly, slx,
    nh, n_bw, H, W, Hq, Wq, d_qk, d_v, qk_coef, rel_coef,
    B_SIZE: tl.constexpr, HALO: tl.constexpr, BQ: tl.constexpr, WIN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_KX: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_REL: tl.constexpr, MASK_PAD: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    qblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    qy, qx, rows, cols, q_ok = _query_block(qblock, n_bw, Hq, Wq, BQ, BLOCK_M)
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sqy + cols[:, None] * sqx + dqk[None, :] * sqd
    q = tl.load(q_ptrs, mask=q_ok[:, None] & (dqk[None, :] < d_qk), other=0.0)
    kx = tl.arange(0, BLOCK_KX)
    x = (qblock % n_bw) * B_SIZE - HALO + kx
    x_ok = (kx < WIN) & (x >= 0) & (x < W)
    rel_off = b * srb + h * srh + rows * sry + cols * srx  # (BLOCK_M,)
    if HAS_REL:
        rw_ptrs = RW + rel_off[:, None] + (kx[None, :] - qx[:, None] + WIN - 1) * srd
        rel_w = tl.load(rw_ptrs, mask=q_ok[:, None] & (kx[None, :] < WIN), other=0.0).to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for ky in range(0, WIN):
        y = (qblock // n_bw) * B_SIZE - HALO + ky
        key_in_map = x_ok & (y >= 0) & (y < H)
        kt_ptrs = K + b * skb + h * skh + y * sky + x[None, :] * skx + dqk[:, None] * skd
        kt = tl.load(kt_ptrs, mask=key_in_map[None, :] & (dqk[:, None] < d_qk), other=0.0)  # (D, BLOCK_KX)
        s = tl.dot(q, kt, input_precision=PRECISION) * qk_coef
        if HAS_REL:
            rel_h = tl.load(RH + rel_off + (ky - qy + WIN - 1) * srd, mask=q_ok, other=0.0).to(tl.float32)
            s += (rel_h[:, None] + rel_w) * rel_coef
        if MASK_PAD:
            allowed = key_in_map
        else:
            allowed = kx < WIN
        s = tl.where(allowed[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        v_ptrs = V + b * svb + h * svh + y * svy + x[:, None] * svx + dv[None, :] * svd
        v = tl.load(v_ptrs, mask=key_in_map[:, None] & (dv[None, :] < d_v), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    o_ptrs = OUT + b * sob + h * soh + rows[:, None] * soy + cols[:, None] * sox + dv[None, :] * sod
    tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=q_ok[:, None] & (dv[None, :] < d_v))
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + b * slb + h * slh + rows * sly + cols * slx, lse, mask=q_ok)


@triton.jit
def _halo_bwd_dq_kernel(
    Q, K, V, RH, RW, DO, LSE, DELTA, DQ, DRH, DRW, SCR,
    sqb, sqh, sqy, sqx, sqd,
    skb, skh, sky, skx, skd,
    svb, svh, svy, svx, svd,
    srb, srh, sry, srx, srd,
    sob, soh, soy, sox, sod,
    sgb, sgh, sgy, sgx, sgd,
    slb, slh, sly, slx,
    scb, sch, scn, scy, scx, scd,
    nh, n_bw, H, W, Hq, Wq, d_qk, d_v, qk_coef, rel_coef, qk_scale, rel_scale,
    B_SIZE: tl.constexpr, HALO: tl.constexpr, BQ: tl.constexpr, WIN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_KX: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_REL: tl.constexpr, MASK_PAD: tl.constexpr, PRECISION: tl.constexpr, WINDOW_GRADS: tl.constexpr,
):  # fmt: skip
    """dq (strides ``sg*``) and the gradients of the RH / RW logit tables (DRH, DRW: zero-initialised, strides
    ``sr*`` as RH) for one query block. Each (query, table entry) is written by this program only.

    ``WINDOW_GRADS``: also write this query block's contribution to dk and dv of every key of its window into
    ``SCR`` (k's dtype, ``(B, nh, block, WIN, WIN, d_qk + d_v)``, strides ``sc*``: dk channels first), from the
    probabilities this kernel computes anyway; :func:`_halo_fold_kernel` sums the overlapping windows."""
    qblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    qy, qx, rows, cols, q_ok = _query_block(qblock, n_bw, Hq, Wq, BQ, BLOCK_M)
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sqy + cols[:, None] * sqx + dqk[None, :] * sqd
    q = tl.load(q_ptrs, mask=q_ok[:, None] & (dqk[None, :] < d_qk), other=0.0)
    do_ptrs = DO + b * sob + h * soh + rows[:, None] * soy + cols[:, None] * sox + dv[None, :] * sod
    do = tl.load(do_ptrs, mask=q_ok[:, None] & (dv[None, :] < d_v), other=0.0)
    row_off = b * slb + h * slh + rows * sly + cols * slx
    lse = tl.load(LSE + row_off, mask=q_ok, other=float("inf"))
    delta = tl.load(DELTA + row_off, mask=q_ok, other=0.0)
    kx = tl.arange(0, BLOCK_KX)
    x = (qblock % n_bw) * B_SIZE - HALO + kx
    x_ok = (kx < WIN) & (x >= 0) & (x < W)
    rel_off = b * srb + h * srh + rows * sry + cols * srx
    rw_index = rel_off[:, None] + (kx[None, :] - qx[:, None] + WIN - 1) * srd
    rw_mask = q_ok[:, None] & (kx[None, :] < WIN)
    if HAS_REL:
        rel_w = tl.load(RW + rw_index, mask=rw_mask, other=0.0).to(tl.float32)
    drel_w = tl.zeros([BLOCK_M, BLOCK_KX], tl.float32)
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    for ky in range(0, WIN):
        y = (qblock // n_bw) * B_SIZE - HALO + ky
        key_in_map = x_ok & (y >= 0) & (y < H)
        k_ptrs = K + b * skb + h * skh + y * sky + x[:, None] * skx + dqk[None, :] * skd
        k = tl.load(k_ptrs, mask=key_in_map[:, None] & (dqk[None, :] < d_qk), other=0.0)  # (BLOCK_KX, D)
        vt_ptrs = V + b * svb + h * svh + y * svy + x[None, :] * svx + dv[:, None] * svd
        vt = tl.load(vt_ptrs, mask=key_in_map[None, :] & (dv[:, None] < d_v), other=0.0)  # (DV, BLOCK_KX)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_coef
        rh_index = rel_off + (ky - qy + WIN - 1) * srd
        if HAS_REL:
            rel_h = tl.load(RH + rh_index, mask=q_ok, other=0.0).to(tl.float32)
            s += (rel_h[:, None] + rel_w) * rel_coef
        if MASK_PAD:
            allowed = key_in_map
        else:
            allowed = kx < WIN
        p = tl.where(allowed[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, vt, input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
        if HAS_REL:
            tl.store(DRH + rh_index, tl.sum(ds, 1) * rel_scale, mask=q_ok)
            drel_w += ds
        if WINDOW_GRADS:
            scr_row = SCR + b * scb + h * sch + qblock * scn + ky * scy + kx[:, None] * scx
            dk_part = tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * qk_scale  # (BLOCK_KX, D)
            tl.store(
                scr_row + dqk[None, :] * scd,
                dk_part.to(SCR.dtype.element_ty),
                mask=(kx[:, None] < WIN) & (dqk[None, :] < d_qk),
            )
            dv_part = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)  # (BLOCK_KX, DV)
            tl.store(
                scr_row + (d_qk + dv[None, :]) * scd,
                dv_part.to(SCR.dtype.element_ty),
                mask=(kx[:, None] < WIN) & (dv[None, :] < d_v),
            )
    dq_ptrs = DQ + b * sgb + h * sgh + rows[:, None] * sgy + cols[:, None] * sgx + dqk[None, :] * sgd
    tl.store(dq_ptrs, (dq * qk_scale).to(DQ.dtype.element_ty), mask=q_ok[:, None] & (dqk[None, :] < d_qk))
    if HAS_REL:
        tl.store(DRW + rw_index, drel_w * rel_scale, mask=rw_mask)


@triton.jit
def _halo_bwd_dkdv_kernel(
    Q, K, V, RH, RW, DO, LSE, DELTA, DK, DV,
    sqb, sqh, sqy, sqx, sqd,
    skb, skh, sky, skx, skd,
    svb, svh, svy, svx, svd,
    srb, srh, sry, srx, srd,
    sob, soh, soy, sox, sod,
    sgb, sgh, sgy, sgx, sgd,
    sub, suh, suy, sux, sud,
    slb, slh, sly, slx,
    nh, n_bh, n_bw, H, W, Hq, Wq, d_qk, d_v, qk_coef, rel_coef, qk_scale,
    B_SIZE: tl.constexpr, HALO: tl.constexpr, BQ: tl.constexpr, WIN: tl.constexpr, REACH: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    HAS_REL: tl.constexpr, MASK_PAD: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    """dk (strides ``sg*``), dv (``su*``) of one ``B_SIZE x B_SIZE`` key block: sums over the query blocks whose
    windows contain it (``REACH = ceil(HALO / B_SIZE)`` blocks each way), in a fixed order, without atomics.

    Keys sit in a ``BLOCK_B x BLOCK_B`` grid (``BLOCK_B`` = the block side rounded up to a power of 2), so key
    ``n`` is at block row ``n // BLOCK_B``: a key's height logit depends only on its row and its width logit only
    on its column. Per query block the kernel loads ``BLOCK_B`` table entries per query for each (not one per
    (key, query) pair, which made this kernel gather-bound) and broadcasts them over the grid."""
    BLOCK_KEYS: tl.constexpr = BLOCK_B * BLOCK_B
    kblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    kby, kbx, y, x, key_ok = _key_block(kblock, n_bw, H, W, B_SIZE, BLOCK_B)
    r = tl.arange(0, BLOCK_B)  # a key row (or column) inside the block
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    k_ptrs = K + b * skb + h * skh + y[:, None] * sky + x[:, None] * skx + dqk[None, :] * skd
    k = tl.load(k_ptrs, mask=key_ok[:, None] & (dqk[None, :] < d_qk), other=0.0)
    v_ptrs = V + b * svb + h * svh + y[:, None] * svy + x[:, None] * svx + dv[None, :] * svd
    v = tl.load(v_ptrs, mask=key_ok[:, None] & (dv[None, :] < d_v), other=0.0)
    dk = tl.zeros([BLOCK_KEYS, BLOCK_DQK], tl.float32)
    dvacc = tl.zeros([BLOCK_KEYS, BLOCK_DV], tl.float32)
    for dy in range(-REACH, REACH + 1):
        for dx in range(-REACH, REACH + 1):
            qby = kby + dy
            qbx = kbx + dx
            block_ok = (qby >= 0) & (qby < n_bh) & (qbx >= 0) & (qbx < n_bw)
            qy, qx, rows, cols, q_ok = _query_block(qby * n_bw + qbx, n_bw, Hq, Wq, BQ, BLOCK_M)
            q_ok = q_ok & block_ok
            ky = y - (qby * B_SIZE - HALO)
            kx = x - (qbx * B_SIZE - HALO)
            in_win = key_ok & (ky >= 0) & (ky < WIN) & (kx >= 0) & (kx < WIN)
            q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sqy + cols[:, None] * sqx + dqk[None, :] * sqd
            q = tl.load(q_ptrs, mask=q_ok[:, None] & (dqk[None, :] < d_qk), other=0.0)
            do_ptrs = DO + b * sob + h * soh + rows[:, None] * soy + cols[:, None] * sox + dv[None, :] * sod
            do = tl.load(do_ptrs, mask=q_ok[:, None] & (dv[None, :] < d_v), other=0.0)
            row_off = b * slb + h * slh + rows * sly + cols * slx
            lse = tl.load(LSE + row_off, mask=q_ok, other=float("inf"))
            delta = tl.load(DELTA + row_off, mask=q_ok, other=0.0)
            st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_coef  # (keys, queries)
            if HAS_REL:
                rel_off = b * srb + h * srh + rows * sry + cols * srx
                # window row / column of this block's key row / column r
                win_y = (kby - qby) * B_SIZE + HALO + r
                win_x = (kbx - qbx) * B_SIZE + HALO + r
                ok_y = ((r < B_SIZE) & (win_y >= 0) & (win_y < WIN))[:, None] & q_ok[None, :]
                ok_x = ((r < B_SIZE) & (win_x >= 0) & (win_x < WIN))[:, None] & q_ok[None, :]
                rh = tl.load(
                    RH + rel_off[None, :] + (win_y[:, None] - qy[None, :] + WIN - 1) * srd, mask=ok_y, other=0.0
                )
                rw = tl.load(
                    RW + rel_off[None, :] + (win_x[:, None] - qx[None, :] + WIN - 1) * srd, mask=ok_x, other=0.0
                )
                rel = rh.to(tl.float32)[:, None, :] + rw.to(tl.float32)[None, :, :]  # (row, col, queries)
                st += tl.reshape(rel, (BLOCK_KEYS, BLOCK_M)) * rel_coef
            pt = tl.where(in_win[:, None] & q_ok[None, :], tl.exp2(st - lse[None, :]), 0.0)
            dvacc += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
            dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
            dst = pt * (dpt - delta[None, :])
            dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    dk_ptrs = DK + b * sgb + h * sgh + y[:, None] * sgy + x[:, None] * sgx + dqk[None, :] * sgd
    tl.store(dk_ptrs, (dk * qk_scale).to(DK.dtype.element_ty), mask=key_ok[:, None] & (dqk[None, :] < d_qk))
    dv_ptrs = DV + b * sub + h * suh + y[:, None] * suy + x[:, None] * sux + dv[None, :] * sud
    tl.store(dv_ptrs, dvacc.to(DV.dtype.element_ty), mask=key_ok[:, None] & (dv[None, :] < d_v))


@triton.jit
def _halo_fold_kernel(
    SCR, DK, DV,
    scb, sch, scn, scy, scx, scd,
    sgb, sgh, sgy, sgx, sgd,
    sub, suh, suy, sux, sud,
    nh, n_bh, n_bw, H, W, d_qk, d_v,
    B_SIZE: tl.constexpr, HALO: tl.constexpr, WIN: tl.constexpr, REACH: tl.constexpr,
    BLOCK_B: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
):  # fmt: skip
    """dk, dv of one key block: the sum, in a fixed order, of the window gradients (``SCR``, written by the dq
    kernel with ``WINDOW_GRADS``) of the query blocks whose windows contain it, in fp32. Deterministic, no
    atomics."""
    BLOCK_KEYS: tl.constexpr = BLOCK_B * BLOCK_B
    kblock = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // nh).to(tl.int64)
    h = (bh % nh).to(tl.int64)
    kby, kbx, y, x, key_ok = _key_block(kblock, n_bw, H, W, B_SIZE, BLOCK_B)
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    dk = tl.zeros([BLOCK_KEYS, BLOCK_DQK], tl.float32)
    dvacc = tl.zeros([BLOCK_KEYS, BLOCK_DV], tl.float32)
    for dy in range(-REACH, REACH + 1):
        for dx in range(-REACH, REACH + 1):
            qby = kby + dy
            qbx = kbx + dx
            block_ok = (qby >= 0) & (qby < n_bh) & (qbx >= 0) & (qbx < n_bw)
            ky = y - (qby * B_SIZE - HALO)
            kx = x - (qbx * B_SIZE - HALO)
            ok = key_ok & block_ok & (ky >= 0) & (ky < WIN) & (kx >= 0) & (kx < WIN)
            base = SCR + b * scb + h * sch + (qby * n_bw + qbx).to(tl.int64) * scn + ky * scy + kx * scx
            dk += tl.load(base[:, None] + dqk[None, :] * scd, mask=ok[:, None] & (dqk[None, :] < d_qk), other=0.0)
            dv_ptrs = base[:, None] + (d_qk + dv[None, :]) * scd
            dvacc += tl.load(dv_ptrs, mask=ok[:, None] & (dv[None, :] < d_v), other=0.0)
    dk_ptrs = DK + b * sgb + h * sgh + y[:, None] * sgy + x[:, None] * sgx + dqk[None, :] * sgd
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=key_ok[:, None] & (dqk[None, :] < d_qk))
    dv_ptrs = DV + b * sub + h * suh + y[:, None] * suy + x[:, None] * sux + dv[None, :] * sud
    tl.store(dv_ptrs, dvacc.to(DV.dtype.element_ty), mask=key_ok[:, None] & (dv[None, :] < d_v))


# the constexprs that change performance: the autotune keys (zoo.ops._triton.launcher; ZOO_OPS_AUTOTUNE)
TUNE_KEY = ("B_SIZE", "HALO", "BQ", "BLOCK_DQK", "BLOCK_DV", "HAS_REL", "PRECISION")
FOLD_TUNE_KEY = ("B_SIZE", "HALO", "BLOCK_DQK", "BLOCK_DV")
halo_fwd = _halo_fwd_kernel
halo_bwd_dq = _halo_bwd_dq_kernel
halo_bwd_dkdv = _halo_bwd_dkdv_kernel
halo_fold = _halo_fold_kernel

# How these kernels were defined (``triton.jit`` reads TRITON_INTERPRET once, at decoration): a plain bool the
# dispatch reads, so that torch.compile traces the check without touching a Triton function object.
INTERPRETED: bool = type(_halo_fwd_kernel).__name__ == "InterpretedFunction"
