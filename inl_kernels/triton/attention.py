"""Causal grouped-query attention in Triton, flash style, forward and backward, with RoPE applied
to q and k as they are loaded, a split-KV path for short queries against a long KV cache, and
the launchers, registered as the torch.library ops `inl::triton_attention` and
`inl::triton_attention_backward` (torch.library.triton_op: torch.compile traces into the kernels).

    out[b, h] = softmax(scale · rot(q[b, h]) · rot(k[b, h // G])ᵀ + mask) · v[b, h // G]

Query i sits at index Skv − Sq + i and, when causal, sees keys j ≤ Skv − Sq + i; rot rotates
(rotate-half) q at its positions and key j at j, or is the identity without rope. With kv_lens /
kv_starts (per batch row, device tensors: a static KV cache read without a host sync, left
padding) row b's keys are [kv_starts[b], kv_lens[b]) of the buffer, its queries end at
kv_lens[b] and positions count from kv_starts[b] (see reference/attention.py).

Layout of the work: every program belongs to one K/V head and handles "rows", the G query heads
of that group interleaved by position (row r = i·G + g is query i of head kv·G + g). A K/V tile is
loaded (and rotated) once for all G heads: K/V are never repeated, and dk/dv sum over the
group inside one program without atomics. The head dim is handled as two halves
(lo = [0, ⌈D/2⌉), hi = the rest) so that the rotate-half rotation, and its inverse for the
gradients, are elementwise on the two halves; for q·kᵀ that is two dots, one per half.

Softmax runs online in fp32 in the log2 domain (scores times scale·log2 e), and the forward
saves the per-row log-sum-exp so the backward recomputes P tile by tile.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.library import wrap_triton

from . import interpreting, multiprocessors, unit_last

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


@triton.jit
def _load_rotated(base, row_off, row_ok, pos, cols, COS, SIN, stride_table,
                  D: tl.constexpr, HALF: tl.constexpr, ROPE: tl.constexpr, ACC: tl.constexpr):
    """Rows of a q or k tile (row_off: element offsets of each row from base) as the two halves
    [R, BLOCK_H] of the head dim, rotated at positions pos when ROPE:
    (x1, x2) -> (x1·c − x2·s, x2·c + x1·s)."""
    ptrs = base + row_off[:, None] + cols[None, :]
    x1 = tl.load(ptrs, mask=row_ok[:, None] & (cols < HALF)[None, :], other=0.0).to(ACC)
    x2 = tl.load(ptrs + HALF, mask=row_ok[:, None] & (cols < D - HALF)[None, :], other=0.0).to(ACC)
    if ROPE:
        t_ptrs = pos.to(tl.int64)[:, None] * stride_table + cols[None, :]
        t_mask = row_ok[:, None] & (cols < HALF)[None, :]
        c = tl.load(COS + t_ptrs, mask=t_mask, other=0.0).to(ACC)
        s = tl.load(SIN + t_ptrs, mask=t_mask, other=0.0).to(ACC)
        r1 = x1 * c - x2 * s
        r2 = x2 * c + x1 * s
        x1 = r1
        x2 = r2
    return x1, x2


@triton.jit
def _store_unrotated(base, row_off, row_ok, pos, cols, g1, g2, COS, SIN, stride_table,
                     D: tl.constexpr, HALF: tl.constexpr, ROPE: tl.constexpr, ACC: tl.constexpr):
    """Stores a gradient taken w.r.t. rotated rows as the gradient w.r.t. the unrotated rows:
    the rotation is orthogonal, so (g1, g2) -> (g1·c + g2·s, g2·c − g1·s)."""
    if ROPE:
        t_ptrs = pos.to(tl.int64)[:, None] * stride_table + cols[None, :]
        t_mask = row_ok[:, None] & (cols < HALF)[None, :]
        c = tl.load(COS + t_ptrs, mask=t_mask, other=0.0).to(ACC)
        s = tl.load(SIN + t_ptrs, mask=t_mask, other=0.0).to(ACC)
        u1 = g1 * c + g2 * s
        u2 = g2 * c - g1 * s
        g1 = u1
        g2 = u2
    ptrs = base + row_off[:, None] + cols[None, :]
    tl.store(ptrs, g1.to(base.dtype.element_ty), mask=row_ok[:, None] & (cols < HALF)[None, :])
    tl.store(ptrs + HALF, g2.to(base.dtype.element_ty), mask=row_ok[:, None] & (cols < D - HALF)[None, :])


@triton.jit
def _key_range(LENS, STARTS, b, Skv, HAS_LENS: tl.constexpr, HAS_STARTS: tl.constexpr):
    """(kv_len, kv_start) of batch row b: its keys are [kv_start, kv_len) of the buffer."""
    if HAS_LENS:
        kv_len = tl.load(LENS + b).to(tl.int32)
    else:
        kv_len = Skv
    if HAS_STARTS:
        kv_start = tl.load(STARTS + b).to(tl.int32)
    else:
        kv_start = 0
    return kv_len, kv_start


@triton.jit
def _key_tiles(qpos_min, qpos_max, kv_start, kv_len, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               HAS_STARTS: tl.constexpr):
    """(lo, full_end, hi): a row tile walks key tiles [lo, full_end) without masks and
    [full_end, hi) with them. With left padding every tile is masked (full_end = lo)."""
    if CAUSAL:
        full_end = (qpos_min + 1) // BLOCK_N * BLOCK_N
        hi = tl.minimum(qpos_max + 1, kv_len)
    else:
        full_end = kv_len // BLOCK_N * BLOCK_N
        hi = kv_len
    lo = 0
    if HAS_STARTS:
        lo = kv_start // BLOCK_N * BLOCK_N
        full_end = lo
    return lo, full_end, hi


@triton.jit
def _forward_block(acc, m_i, l_i, q1, q2, qpos, start, K_head, V_head, sk_s, sv_s, kv_start, kv_len, qk_scale,
                   cols_h, cols_d, COS, SIN, stride_table,
                   D: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                   ROPE: tl.constexpr, MASK: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr):
    """One key tile of the online softmax: s = q·kᵀ·scale·log2 e, m' = max(m, rowmax s),
    l' = l·2^(m−m') + Σ 2^(s−m'), acc' = acc·2^(m−m') + 2^(s−m')·v. Keys [kv_start, kv_len) exist
    (key j at RoPE position j − kv_start); MASK applies that bound and the causal mask (only the
    tiles that need them pass MASK)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < kv_len) & (offs_n >= kv_start)
    k1, k2 = _load_rotated(K_head, offs_n * sk_s, n_ok, offs_n - kv_start, cols_h, COS, SIN, stride_table, D, HALF,
                           ROPE, ACC)
    s = tl.dot(q1, tl.trans(k1.to(DOT)), input_precision="ieee", out_dtype=ACC)
    s = tl.dot(q2, tl.trans(k2.to(DOT)), s, input_precision="ieee", out_dtype=ACC)
    s = s * qk_scale
    if MASK:
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= qpos[:, None])
        s = tl.where(ok, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_sub = m_new
    if MASK:
        # a row that has seen no visible key yet keeps m = -inf (so the next real max replaces
        # it); subtract 0 instead of -inf meanwhile (no inf − inf)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_sub[:, None])
    alpha = tl.exp2(m_i - m_sub)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    v = tl.load(V_head + offs_n[:, None] * sv_s + cols_d[None, :], mask=n_ok[:, None] & (cols_d < D)[None, :],
                other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(DOT), v.to(DOT), input_precision="ieee", out_dtype=ACC)
    return acc, m_new, l_i


@triton.jit
def _attn_forward(Q, K, V, O, LSE, COS, SIN, O_PART, M_PART, L_PART, LENS, STARTS,
                  sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, stride_table,
                  Hkv, G, Sq, Skv, qk_scale, keys_per_split,
                  D: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr,
                  SPLIT: tl.constexpr, HAS_LENS: tl.constexpr, HAS_STARTS: tl.constexpr, DOT: tl.constexpr,
                  ACC: tl.constexpr):
    """Program (row tile, b·Hkv + kv, split): o = softmax(scale·q·kᵀ + mask)·v for BLOCK_M rows of
    the group, lse = log2 Σ_j 2^(scale·log2e·q·k_j) per row. Without SPLIT it walks all visible keys:
    first the tiles every row sees whole (no mask), then the diagonal / last tile (masked). With
    SPLIT it walks keys [split·keys_per_split, …+keys_per_split) and stores the unnormalised
    (acc, m, l) for _attn_combine. HAS_LENS / HAS_STARTS: the row's keys are [STARTS[b], LENS[b])
    of the buffer (a static KV cache, left padding; see the reference)."""
    pid_m = tl.program_id(0)
    bkv = tl.program_id(1)
    split = tl.program_id(2)
    b = (bkv // Hkv).to(tl.int64)
    kv = bkv % Hkv
    R = G * Sq
    kv_len, kv_start = _key_range(LENS, STARTS, b, Skv, HAS_LENS, HAS_STARTS)
    off = kv_len - Sq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    i = rows // G
    g = rows % G
    qpos = off + i
    cols_h = tl.arange(0, BLOCK_H)
    cols_d = tl.arange(0, BLOCK_D)

    q1, q2 = _load_rotated(Q + b * sq_b + kv * G * sq_h, g * sq_h + i * sq_s, row_ok, tl.maximum(qpos - kv_start, 0),
                           cols_h, COS, SIN, stride_table, D, HALF, ROPE, ACC)
    q1 = q1.to(DOT)
    q2 = q2.to(DOT)
    K_head = K + b * sk_b + kv * sk_h
    V_head = V + b * sv_b + kv * sv_h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l_i = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    qpos_min = off + (pid_m * BLOCK_M) // G
    qpos_max = off + tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, R - 1) // G
    if SPLIT:
        lo = split * keys_per_split
        hi = tl.minimum(lo + keys_per_split, kv_len)
        if HAS_STARTS:
            lo = tl.maximum(lo, kv_start // BLOCK_N * BLOCK_N)
        if CAUSAL:
            hi = tl.minimum(hi, qpos_max + 1)
        for start in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _forward_block(acc, m_i, l_i, q1, q2, qpos, start, K_head, V_head, sk_s, sv_s, kv_start,
                                           kv_len, qk_scale, cols_h, cols_d, COS, SIN, stride_table,
                                           D, HALF, BLOCK_N, CAUSAL, ROPE, True, DOT, ACC)
        part = (split * tl.num_programs(1) + bkv).to(tl.int64) * R
        tl.store(M_PART + part + rows, m_i, mask=row_ok)
        tl.store(L_PART + part + rows, l_i, mask=row_ok)
        tl.store(O_PART + (part + rows)[:, None] * BLOCK_D + cols_d[None, :], acc, mask=row_ok[:, None])
    else:
        lo, full_end, hi = _key_tiles(qpos_min, qpos_max, kv_start, kv_len, BLOCK_N, CAUSAL, HAS_STARTS)
        for start in range(lo, full_end, BLOCK_N):
            acc, m_i, l_i = _forward_block(acc, m_i, l_i, q1, q2, qpos, start, K_head, V_head, sk_s, sv_s, kv_start,
                                           kv_len, qk_scale, cols_h, cols_d, COS, SIN, stride_table,
                                           D, HALF, BLOCK_N, CAUSAL, ROPE, False, DOT, ACC)
        for start in range(full_end, hi, BLOCK_N):
            acc, m_i, l_i = _forward_block(acc, m_i, l_i, q1, q2, qpos, start, K_head, V_head, sk_s, sv_s, kv_start,
                                           kv_len, qk_scale, cols_h, cols_d, COS, SIN, stride_table,
                                           D, HALF, BLOCK_N, CAUSAL, ROPE, True, DOT, ACC)
        # padding rows (never stored) and queries that see no key (left padding: a zero output) stay finite
        l_safe = tl.where(l_i > 0, l_i, 1.0)
        o = acc / l_safe[:, None]
        o_ptrs = O + b * so_b + (kv * G + g)[:, None] * so_h + i[:, None] * so_s + cols_d[None, :]
        tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & (cols_d < D)[None, :])
        tl.store(LSE + bkv.to(tl.int64) * R + rows, m_i + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _attn_combine(O_PART, M_PART, L_PART, O, LSE, so_b, so_h, so_s, Hkv, G, Sq, num_splits,
                  D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """Merges the split partials of each row: m = max_s m_s, l = Σ_s 2^(m_s−m)·l_s,
    o = Σ_s 2^(m_s−m)·acc_s / l, lse = m + log2 l. A split that saw no visible key has
    m_s = −inf, l_s = 0 and weighs nothing."""
    pid_m = tl.program_id(0)
    bkv = tl.program_id(1)
    b = (bkv // Hkv).to(tl.int64)
    kv = bkv % Hkv
    R = G * Sq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    i = rows // G
    g = rows % G
    cols_d = tl.arange(0, BLOCK_D)
    m = tl.full([BLOCK_M], float("-inf"), dtype=ACC)
    l = tl.zeros([BLOCK_M], dtype=ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC)
    for split in range(0, num_splits):
        part = (split * tl.num_programs(1) + bkv).to(tl.int64) * R
        m_s = tl.load(M_PART + part + rows, mask=row_ok, other=float("-inf"))
        l_s = tl.load(L_PART + part + rows, mask=row_ok, other=0.0)
        acc_s = tl.load(O_PART + (part + rows)[:, None] * BLOCK_D + cols_d[None, :], mask=row_ok[:, None],
                        other=0.0)
        m_new = tl.maximum(m, m_s)
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        a_old = tl.exp2(m - m_sub)
        a_s = tl.exp2(m_s - m_sub)
        l = l * a_old + l_s * a_s
        acc = acc * a_old[:, None] + acc_s * a_s[:, None]
        m = m_new
    l_safe = tl.where(l > 0, l, 1.0)
    o_ptrs = O + b * so_b + (kv * G + g)[:, None] * so_h + i[:, None] * so_s + cols_d[None, :]
    tl.store(o_ptrs, (acc / l_safe[:, None]).to(O.dtype.element_ty), mask=row_ok[:, None] & (cols_d < D)[None, :])
    tl.store(LSE + bkv.to(tl.int64) * R + rows, m + tl.log2(l_safe), mask=row_ok)


@triton.jit
def _attn_delta(O, DO, DELTA, so_b, so_h, so_s, sdo_b, sdo_h, sdo_s, Hkv, G, Sq,
                D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC: tl.constexpr):
    """delta = Σ_d o·do per row (= Σ_j P·dP, the softmax backward's row term)."""
    pid_m = tl.program_id(0)
    bkv = tl.program_id(1)
    b = (bkv // Hkv).to(tl.int64)
    kv = bkv % Hkv
    R = G * Sq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    i = rows // G
    g = rows % G
    cols_d = tl.arange(0, BLOCK_D)
    mask = row_ok[:, None] & (cols_d < D)[None, :]
    o = tl.load(O + b * so_b + (kv * G + g)[:, None] * so_h + i[:, None] * so_s + cols_d[None, :], mask=mask,
                other=0.0).to(ACC)
    do = tl.load(DO + b * sdo_b + (kv * G + g)[:, None] * sdo_h + i[:, None] * sdo_s + cols_d[None, :], mask=mask,
                 other=0.0).to(ACC)
    tl.store(DELTA + bkv.to(tl.int64) * R + rows, tl.sum(o * do, axis=1), mask=row_ok)


@triton.jit
def _dq_block(dq1, dq2, q1, q2, do, lse, delta, qpos, start, K_head, V_head, sk_s, sv_s, kv_start, kv_len, qk_scale,
              cols_h, cols_d, COS, SIN, stride_table,
              D: tl.constexpr, HALF: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
              ROPE: tl.constexpr, MASK: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr):
    """One key tile of dq: P = 2^(s − lse), dP = do·vᵀ, dS = P·(dP − delta), dq += dS·k (per half).
    MASK applies the key bound and the causal mask: a padded key scores 0, and 2^(0 − lse)
    overflows when every real score is far below zero (inf·0 would then reach dq)."""
    offs_n = start + tl.arange(0, BLOCK_N)
    n_ok = (offs_n < kv_len) & (offs_n >= kv_start)
    k1, k2 = _load_rotated(K_head, offs_n * sk_s, n_ok, offs_n - kv_start, cols_h, COS, SIN, stride_table, D, HALF,
                           ROPE, ACC)
    k1 = k1.to(DOT)
    k2 = k2.to(DOT)
    s = tl.dot(q1, tl.trans(k1), input_precision="ieee", out_dtype=ACC)
    s = tl.dot(q2, tl.trans(k2), s, input_precision="ieee", out_dtype=ACC)
    p = tl.exp2(s * qk_scale - lse[:, None])
    if MASK:
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= qpos[:, None])
        p = tl.where(ok, p, 0.0)
    v = tl.load(V_head + offs_n[:, None] * sv_s + cols_d[None, :], mask=n_ok[:, None] & (cols_d < D)[None, :],
                other=0.0).to(DOT)
    dp = tl.dot(do, tl.trans(v), input_precision="ieee", out_dtype=ACC)
    ds = (p * (dp - delta[:, None])).to(DOT)
    dq1 = tl.dot(ds, k1, dq1, input_precision="ieee", out_dtype=ACC)
    dq2 = tl.dot(ds, k2, dq2, input_precision="ieee", out_dtype=ACC)
    return dq1, dq2


@triton.jit
def _attn_backward_dq(Q, K, V, DO, LSE, DELTA, DQ, COS, SIN, LENS, STARTS,
                      sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s,
                      sdq_b, sdq_h, sdq_s, stride_table, Hkv, G, Sq, Skv, qk_scale, scale,
                      D: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr,
                      HAS_LENS: tl.constexpr, HAS_STARTS: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr):
    """dq = scale · Σ_j dS_ij · k_j with dS = P·(do·vᵀ − delta), P recomputed from the saved lse;
    then rotated back (the gradient w.r.t. the unrotated q). Padding rows load lse = +inf, so
    their P is 0."""
    pid_m = tl.program_id(0)
    bkv = tl.program_id(1)
    b = (bkv // Hkv).to(tl.int64)
    kv = bkv % Hkv
    R = G * Sq
    kv_len, kv_start = _key_range(LENS, STARTS, b, Skv, HAS_LENS, HAS_STARTS)
    off = kv_len - Sq
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    i = rows // G
    g = rows % G
    qpos = off + i
    cols_h = tl.arange(0, BLOCK_H)
    cols_d = tl.arange(0, BLOCK_D)
    q1, q2 = _load_rotated(Q + b * sq_b + kv * G * sq_h, g * sq_h + i * sq_s, row_ok, tl.maximum(qpos - kv_start, 0),
                           cols_h, COS, SIN, stride_table, D, HALF, ROPE, ACC)
    q1 = q1.to(DOT)
    q2 = q2.to(DOT)
    do = tl.load(DO + b * sdo_b + (kv * G + g)[:, None] * sdo_h + i[:, None] * sdo_s + cols_d[None, :],
                 mask=row_ok[:, None] & (cols_d < D)[None, :], other=0.0).to(DOT)
    lse = tl.load(LSE + bkv.to(tl.int64) * R + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + bkv.to(tl.int64) * R + rows, mask=row_ok, other=0.0)
    K_head = K + b * sk_b + kv * sk_h
    V_head = V + b * sv_b + kv * sv_h
    dq1 = tl.zeros([BLOCK_M, BLOCK_H], dtype=ACC)
    dq2 = tl.zeros([BLOCK_M, BLOCK_H], dtype=ACC)
    qpos_min = off + (pid_m * BLOCK_M) // G
    qpos_max = off + tl.minimum(pid_m * BLOCK_M + BLOCK_M - 1, R - 1) // G
    lo, full_end, hi = _key_tiles(qpos_min, qpos_max, kv_start, kv_len, BLOCK_N, CAUSAL, HAS_STARTS)
    for start in range(lo, full_end, BLOCK_N):
        dq1, dq2 = _dq_block(dq1, dq2, q1, q2, do, lse, delta, qpos, start, K_head, V_head, sk_s, sv_s, kv_start,
                             kv_len, qk_scale, cols_h, cols_d, COS, SIN, stride_table, D, HALF, BLOCK_N, CAUSAL, ROPE,
                             False, DOT, ACC)
    for start in range(full_end, hi, BLOCK_N):
        dq1, dq2 = _dq_block(dq1, dq2, q1, q2, do, lse, delta, qpos, start, K_head, V_head, sk_s, sv_s, kv_start,
                             kv_len, qk_scale, cols_h, cols_d, COS, SIN, stride_table, D, HALF, BLOCK_N, CAUSAL, ROPE,
                             True, DOT, ACC)
    _store_unrotated(DQ + b * sdq_b + kv * G * sdq_h, g * sdq_h + i * sdq_s, row_ok, tl.maximum(qpos - kv_start, 0),
                     cols_h, dq1 * scale, dq2 * scale, COS, SIN, stride_table, D, HALF, ROPE, ACC)


@triton.jit
def _dkdv_block(dk1, dk2, dv, k1, k2, v, offs_n, r0, Q_group, DO_group, LSE_row, DELTA_row,
                sq_h, sq_s, sdo_h, sdo_s, G, R, off, kv_start, qk_scale, cols_h, cols_d, COS, SIN, stride_table,
                D: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, ROPE: tl.constexpr,
                MASK: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr):
    """One row tile of dk, dv (transposed scores): Pᵀ = 2^(k·qᵀ·scale·log2e − lse), dv += Pᵀ·do,
    dSᵀ = Pᵀ·(v·doᵀ − delta), dk += dSᵀ·q (per half; scaled by the caller)."""
    rows = r0 + tl.arange(0, BLOCK_M)
    row_ok = rows < R
    i = rows // G
    g = rows % G
    qpos = off + i
    q1, q2 = _load_rotated(Q_group, g * sq_h + i * sq_s, row_ok, tl.maximum(qpos - kv_start, 0), cols_h, COS, SIN,
                           stride_table, D, HALF, ROPE, ACC)
    q1 = q1.to(DOT)
    q2 = q2.to(DOT)
    do = tl.load(DO_group + (g * sdo_h + i * sdo_s)[:, None] + cols_d[None, :],
                 mask=row_ok[:, None] & (cols_d < D)[None, :], other=0.0).to(DOT)
    lse = tl.load(LSE_row + rows, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA_row + rows, mask=row_ok, other=0.0)
    st = tl.dot(k1, tl.trans(q1), input_precision="ieee", out_dtype=ACC)
    st = tl.dot(k2, tl.trans(q2), st, input_precision="ieee", out_dtype=ACC)
    pt = tl.exp2(st * qk_scale - lse[None, :])
    if MASK:
        pt = tl.where(offs_n[:, None] <= qpos[None, :], pt, 0.0)
    dv = tl.dot(pt.to(DOT), do, dv, input_precision="ieee", out_dtype=ACC)
    dpt = tl.dot(v, tl.trans(do), input_precision="ieee", out_dtype=ACC)
    dst = (pt * (dpt - delta[None, :])).to(DOT)
    dk1 = tl.dot(dst, q1, dk1, input_precision="ieee", out_dtype=ACC)
    dk2 = tl.dot(dst, q2, dk2, input_precision="ieee", out_dtype=ACC)
    return dk1, dk2, dv


@triton.jit
def _attn_backward_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, COS, SIN, LENS, STARTS,
                        sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sdo_b, sdo_h, sdo_s,
                        sdk_b, sdk_h, sdk_s, sdv_b, sdv_h, sdv_s, stride_table, Hkv, G, Sq, Skv, qk_scale, scale,
                        D: tl.constexpr, HALF: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, ROPE: tl.constexpr,
                        HAS_LENS: tl.constexpr, HAS_STARTS: tl.constexpr, DOT: tl.constexpr, ACC: tl.constexpr):
    """dv_j = Σ_rows P_rj·do_r and dk_j = scale · Σ_rows dS_rj·q_r over every row of the group (all G
    query heads) that sees key j, in one program: no repeated K/V, no atomics. dk is rotated back
    at the key positions. Causal: row tiles that straddle the diagonal are masked, the rest not."""
    pid_n = tl.program_id(0)
    bkv = tl.program_id(1)
    b = (bkv // Hkv).to(tl.int64)
    kv = bkv % Hkv
    R = G * Sq
    kv_len, kv_start = _key_range(LENS, STARTS, b, Skv, HAS_LENS, HAS_STARTS)
    off = kv_len - Sq
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    n_in = offs_n < Skv
    # keys outside [kv_start, kv_len) (padding, unwritten cache) are never seen: zero gradients
    n_ok = n_in & (offs_n < kv_len) & (offs_n >= kv_start)
    cols_h = tl.arange(0, BLOCK_H)
    cols_d = tl.arange(0, BLOCK_D)
    k1, k2 = _load_rotated(K + b * sk_b + kv * sk_h, offs_n * sk_s, n_ok, offs_n - kv_start, cols_h, COS, SIN,
                           stride_table, D, HALF, ROPE, ACC)
    k1 = k1.to(DOT)
    k2 = k2.to(DOT)
    v = tl.load(V + b * sv_b + kv * sv_h + offs_n[:, None] * sv_s + cols_d[None, :],
                mask=n_ok[:, None] & (cols_d < D)[None, :], other=0.0).to(DOT)
    dk1 = tl.zeros([BLOCK_N, BLOCK_H], dtype=ACC)
    dk2 = tl.zeros([BLOCK_N, BLOCK_H], dtype=ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC)
    Q_group = Q + b * sq_b + kv * G * sq_h
    DO_group = DO + b * sdo_b + kv * G * sdo_h
    LSE_row = LSE + bkv.to(tl.int64) * R
    DELTA_row = DELTA + bkv.to(tl.int64) * R
    rows_end = tl.cdiv(R, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # rows see key j when off + i >= j; all keys of the tile once off + i >= n0 + BLOCK_N - 1
        r_lo = (G * tl.maximum(n0 - off, 0)) // BLOCK_M * BLOCK_M
        r_full = tl.minimum(tl.cdiv(G * tl.maximum(n0 + BLOCK_N - 1 - off, 0), BLOCK_M) * BLOCK_M, rows_end)
    else:
        r_lo = 0
        r_full = 0
    for r0 in range(r_lo, r_full, BLOCK_M):
        dk1, dk2, dv = _dkdv_block(dk1, dk2, dv, k1, k2, v, offs_n, r0, Q_group, DO_group, LSE_row, DELTA_row,
                                   sq_h, sq_s, sdo_h, sdo_s, G, R, off, kv_start, qk_scale, cols_h, cols_d, COS, SIN,
                                   stride_table, D, HALF, BLOCK_M, ROPE, True, DOT, ACC)
    for r0 in range(r_full, rows_end, BLOCK_M):
        dk1, dk2, dv = _dkdv_block(dk1, dk2, dv, k1, k2, v, offs_n, r0, Q_group, DO_group, LSE_row, DELTA_row,
                                   sq_h, sq_s, sdo_h, sdo_s, G, R, off, kv_start, qk_scale, cols_h, cols_d, COS, SIN,
                                   stride_table, D, HALF, BLOCK_M, ROPE, False, DOT, ACC)
    # a key nobody sees (padding, unwritten cache) gets zero gradients, whatever its tiles summed
    dk1 = tl.where(n_ok[:, None], dk1, 0.0)
    dk2 = tl.where(n_ok[:, None], dk2, 0.0)
    dv = tl.where(n_ok[:, None], dv, 0.0)
    _store_unrotated(DK + b * sdk_b + kv * sdk_h, offs_n * sdk_s, n_in, tl.maximum(offs_n - kv_start, 0), cols_h,
                     dk1 * scale, dk2 * scale, COS, SIN, stride_table, D, HALF, ROPE, ACC)
    tl.store(DV + b * sdv_b + kv * sdv_h + offs_n[:, None] * sdv_s + cols_d[None, :], dv.to(DV.dtype.element_ty),
             mask=n_in[:, None] & (cols_d < D)[None, :])


def _dtypes(dtype):
    """(DOT, ACC): fp32 state everywhere (fp64 for fp64, which only the interpreter runs); dots in
    the input dtype on a GPU, in the state dtype under the interpreter (its bf16 dot is wrong)."""
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    if interpreting():
        return acc, acc
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}[dtype], acc


def _config(D, device, dtype, backward=False):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Untuned GPU defaults; small tiles under the
    interpreter so tests cross tile borders at small sizes. fp32 dots run exact (no tf32) on
    CUDA cores, whose register footprint asks for small tiles."""
    if device.type != "cuda":
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return 32, 32, 4, 2
    if backward:
        return (64, 64, 4, 2) if D <= 64 else (64, 64, 8, 2) if D <= 128 else (32, 32, 8, 1)
    return (128, 64, 4, 3) if D <= 64 else (128, 64, 8, 3) if D <= 128 else (64, 32, 8, 2)


def _target_programs(device):
    """Programs that fill the machine: two per SM on a GPU, a few under the interpreter."""
    if device.type == "cuda":
        return 2 * multiprocessors(device)
    return 4


def _forward(q, k, v, causal, scale, cos, sin, lens=None, starts=None, num_splits=None):
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G, R = Hq // Hkv, (Hq // Hkv) * Sq
    acc_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hkv, R, dtype=acc_dtype, device=q.device)
    if o.numel() == 0:
        return o, lse
    DOT, ACC = _dtypes(q.dtype)
    half = (D + 1) // 2
    block_h = max(16, triton.next_power_of_2(half))
    block_d = max(16, triton.next_power_of_2(D))
    block_m, block_n, warps, stages = _config(D, q.device, q.dtype)
    block_m = min(block_m, max(16, triton.next_power_of_2(R)))
    row_tiles = triton.cdiv(R, block_m)
    key_tiles = triton.cdiv(Skv, block_n)
    if num_splits is None:
        # split the keys only when one program per row tile would leave the machine idle (decode)
        programs = row_tiles * B * Hkv
        target = _target_programs(q.device)
        num_splits = 1 if programs * 2 > target else min(key_tiles, triton.cdiv(target, programs))
    num_splits = max(1, min(int(num_splits), key_tiles))
    keys_per_split = triton.cdiv(key_tiles, num_splits) * block_n
    num_splits = triton.cdiv(Skv, keys_per_split)
    rope = cos is not None
    table = (cos, sin) if rope else (q, q)
    stride_table = cos.stride(0) if rope else 0
    split = num_splits > 1
    if split:
        o_part = torch.empty(num_splits, B * Hkv, R, block_d, dtype=acc_dtype, device=q.device)
        m_part = torch.empty(num_splits, B * Hkv, R, dtype=acc_dtype, device=q.device)
        l_part = torch.empty_like(m_part)
    else:
        o_part = m_part = l_part = lse
    wrap_triton(_attn_forward)[(row_tiles, B * Hkv, num_splits)](
        q, k, v, o, lse, table[0], table[1], o_part, m_part, l_part, _or(lens, lse), _or(starts, lse),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), o.stride(0), o.stride(1), o.stride(2), stride_table,
        Hkv, G, Sq, Skv, scale * LOG2E, keys_per_split,
        D=D, HALF=half, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_D=block_d, CAUSAL=causal,
        ROPE=rope, SPLIT=split, HAS_LENS=lens is not None, HAS_STARTS=starts is not None, DOT=DOT, ACC=ACC,
        num_warps=warps, num_stages=stages)
    if split:
        wrap_triton(_attn_combine)[(row_tiles, B * Hkv)](
            o_part, m_part, l_part, o, lse, o.stride(0), o.stride(1), o.stride(2), Hkv, G, Sq, num_splits,
            D=D, BLOCK_M=block_m, BLOCK_D=block_d, ACC=ACC, num_warps=4)
    return o, lse


def _backward(do, q, k, v, o, lse, causal, scale, cos, sin, lens=None, starts=None):
    B, Hq, Sq, D = q.shape
    Hkv, Skv = k.shape[1], k.shape[2]
    G, R = Hq // Hkv, (Hq // Hkv) * Sq
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0:
        return dq, dk.zero_(), dv.zero_()
    DOT, ACC = _dtypes(q.dtype)
    half = (D + 1) // 2
    block_h = max(16, triton.next_power_of_2(half))
    block_d = max(16, triton.next_power_of_2(D))
    block_m, block_n, warps, stages = _config(D, q.device, q.dtype, backward=True)
    block_m = min(block_m, max(16, triton.next_power_of_2(R)))
    rope = cos is not None
    table = (cos, sin) if rope else (q, q)
    stride_table = cos.stride(0) if rope else 0
    delta = torch.empty_like(lse)
    wrap_triton(_attn_delta)[(triton.cdiv(R, block_m), B * Hkv)](
        o, do, delta, o.stride(0), o.stride(1), o.stride(2), do.stride(0), do.stride(1), do.stride(2),
        Hkv, G, Sq, D=D, BLOCK_M=block_m, BLOCK_D=block_d, ACC=ACC, num_warps=4)
    common = dict(D=D, HALF=half, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_H=block_h, BLOCK_D=block_d,
                  CAUSAL=causal, ROPE=rope, HAS_LENS=lens is not None, HAS_STARTS=starts is not None, DOT=DOT,
                  ACC=ACC, num_warps=warps, num_stages=stages)
    ranges = (_or(lens, lse), _or(starts, lse))
    wrap_triton(_attn_backward_dq)[(triton.cdiv(R, block_m), B * Hkv)](
        q, k, v, do, lse, delta, dq, table[0], table[1], *ranges,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dq.stride(0), dq.stride(1), dq.stride(2), stride_table, Hkv, G, Sq, Skv, scale * LOG2E, scale, **common)
    wrap_triton(_attn_backward_dkdv)[(triton.cdiv(Skv, block_n), B * Hkv)](
        q, k, v, do, lse, delta, dk, dv, table[0], table[1], *ranges,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2),
        dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), stride_table,
        Hkv, G, Sq, Skv, scale * LOG2E, scale, **common)
    return dq, dk, dv


@torch.library.triton_op("inl::triton_attention", mutates_args=())
def triton_attention_op(q: Tensor, k: Tensor, v: Tensor, cos: Optional[Tensor], sin: Optional[Tensor],
                        kv_lens: Optional[Tensor], kv_starts: Optional[Tensor], causal: bool, scale: float,
                        num_splits: int) -> tuple[Tensor, Tensor]:
    """(o, lse): the attention and each row's log2-sum-exp (saved for the backward); num_splits 0
    lets the launcher choose the split-KV factor."""
    return _forward(q, k, v, causal, scale, cos, sin, kv_lens, kv_starts, num_splits or None)


@torch.library.triton_op("inl::triton_attention_backward", mutates_args=())
def triton_attention_backward_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                                 cos: Optional[Tensor], sin: Optional[Tensor], kv_lens: Optional[Tensor],
                                 kv_starts: Optional[Tensor], causal: bool, scale: float) -> tuple[Tensor, Tensor,
                                                                                                   Tensor]:
    """(dq, dk, dv) of the unrotated q and k."""
    return _backward(unit_last(do), q, k, v, o, lse, causal, scale, cos, sin, kv_lens, kv_starts)


def _setup_context(ctx, inputs, output):
    q, k, v, cos, sin, kv_lens, kv_starts, causal, scale, _splits = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cos, sin, kv_lens, kv_starts)
    ctx.causal, ctx.scale = causal, scale


def _backward_formula(ctx, do, _dlse):
    q, k, v, o, lse, cos, sin, kv_lens, kv_starts = ctx.saved_tensors
    dq, dk, dv = triton_attention_backward_op(do, q, k, v, o, lse, cos, sin, kv_lens, kv_starts, ctx.causal,
                                              ctx.scale)
    return dq, dk, dv, None, None, None, None, None, None, None


triton_attention_op.register_autograd(_backward_formula, setup_context=_setup_context)


def _or(t, dummy):
    """t, or any tensor standing in for a pointer the kernel does not read (its HAS_ flag is off)."""
    return dummy if t is None else t


def supports(q, k, v, causal, scale, rope, kv_lens=None, kv_starts=None):
    if q.dtype == torch.float64 and not interpreting():
        return "float64 runs on the reference (the triton kernels compute in fp32 on a GPU)"
    if q.shape[-1] > MAX_HEAD_DIM:
        return f"head dims above {MAX_HEAD_DIM} are not handled (got {q.shape[-1]})"
    if rope is not None and (rope[0].requires_grad or rope[1].requires_grad):
        return "the kernel gives no gradient to the rope tables (cos, sin)"
    return None


def attention(q, k, v, causal, scale, rope, kv_lens=None, kv_starts=None, num_splits=None):
    """SPEC §3 gqa_attention: q [B, Hq, Sq, D], k/v [B, Hkv, Skv, D] -> [B, Hq, Sq, D]; kv_lens,
    kv_starts [B] as in the reference (a static KV cache, left padding). num_splits (tests):
    the split-KV factor, else the launcher's choice."""
    cos, sin = rope if rope is not None else (None, None)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return triton_attention_op(q, k, v, cos, sin, kv_lens, kv_starts, causal, scale, num_splits or 0)[0]
