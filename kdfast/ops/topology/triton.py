"""Triton kernels for the topology losses (FTD Gram rewrite, HTD entity-level tiled masked sum).

Imported on first use by kdfast.ops.topology, so TRITON_INTERPRET set by the tests applies. All dots
use input_precision="ieee" (no TF32): the Gram rewrite subtracts large sums and needs full fp32
products. Everything is computed in float32 (float64 inputs too: use the cpp or torch backend for
float64 accuracy).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

_TILE = 64  # Gram / gradient column tile
_ROWS = 32  # rows per step
# The gradient kernels' (Z W) tiles: k steps of _KT columns, _GRAD_WARPS warps. With 64-column k
# steps and 4 warps, ptxas gave them 255 registers and spilled 256-688 bytes (sm_90,
# bench/compile_triton.py); with 16-column steps and 8 warps none spills at the check and timing
# shapes.
_KT = 16
_GRAD_WARPS = 8


@triton.jit
def _inv_norm_kernel(
    x_ptr, out_ptr, n, d, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, ND: tl.constexpr
):
    # out[a] = 1 / ||x_a|| (0 for a zero row), fp32 accumulation. The squares are taken of
    # x_a / m_a, m_a = max |x_a|, so that rows far from 1 in scale (1e20, 1e-25) neither overflow
    # nor underflow. Memory: reads x twice (the max, then the scaled squares) in [BLOCK_N, BLOCK_D]
    # tiles, writes n floats.
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    m = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c in range(ND):
        cols = c * BLOCK_D + tl.arange(0, BLOCK_D)
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * d + cols[None, :],
            mask=rmask[:, None] & (cols[None, :] < d),
            other=0.0,
        ).to(tl.float32)
        m = tl.maximum(m, tl.max(tl.abs(x), axis=1))
    scale = tl.where(m > 0, 1.0 / tl.where(m > 0, m, 1.0), 0.0)
    ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for c in range(ND):
        cols = c * BLOCK_D + tl.arange(0, BLOCK_D)
        x = tl.load(
            x_ptr + rows[:, None].to(tl.int64) * d + cols[None, :],
            mask=rmask[:, None] & (cols[None, :] < d),
            other=0.0,
        ).to(tl.float32)
        xs = x * scale[:, None]
        ss += tl.sum(xs * xs, axis=1)
    inv = tl.where(ss > 0, scale / tl.sqrt(tl.where(ss > 0, ss, 1.0)), 0.0)
    tl.store(out_ptr + rows, inv, mask=rmask)


@triton.jit
def _load_z(t_ptr, s_ptr, it_ptr, is_ptr, rows, rmask, cols, dt, ds):
    # Z[rows, cols] with Z = [t * inv_t | s * inv_s] (columns >= dt + ds are 0), fp32.
    r64 = rows.to(tl.int64)
    in_t = cols < dt
    in_s = (cols >= dt) & (cols < dt + ds)
    tv = tl.load(
        t_ptr + r64[:, None] * dt + cols[None, :], mask=rmask[:, None] & in_t[None, :], other=0.0
    )
    sv = tl.load(
        s_ptr + r64[:, None] * ds + (cols - dt)[None, :],
        mask=rmask[:, None] & in_s[None, :],
        other=0.0,
    )
    it = tl.load(it_ptr + rows, mask=rmask, other=0.0)
    is_ = tl.load(is_ptr + rows, mask=rmask, other=0.0)
    return tl.where(
        in_t[None, :], tv.to(tl.float32) * it[:, None], sv.to(tl.float32) * is_[:, None]
    )


@triton.jit
def _gram_partial_kernel(
    t_ptr,
    s_ptr,
    it_ptr,
    is_ptr,
    pair_i_ptr,
    pair_j_ptr,
    part_ptr,
    n,
    dt,
    ds,
    rows_per_split,
    D_PAD: tl.constexpr,
    TILE: tl.constexpr,
    ROWS: tl.constexpr,
):
    # FTD pass 1: part[split, I, J] = sum_{a in split} Z[a, I]^T Z[a, J] for one (I, J) column tile
    # pair with I <= J (the Gram is symmetric: the host mirrors the upper tiles). Grid (n_splits,
    # n_pairs). Reads the split's rows of t, s (each row read once per column tile pair); keeps a
    # TILE x TILE fp32 accumulator in registers; writes one tile of the [n_splits, D_PAD, D_PAD]
    # partial buffer. The splits are summed afterwards in a fixed order (no atomics).
    split = tl.program_id(0)
    pair = tl.program_id(1)
    ci = tl.load(pair_i_ptr + pair) * TILE + tl.arange(0, TILE)
    cj = tl.load(pair_j_ptr + pair) * TILE + tl.arange(0, TILE)
    r_begin = split * rows_per_split
    acc = tl.zeros((TILE, TILE), dtype=tl.float32)
    r_end = tl.minimum(r_begin + rows_per_split, n)
    r0 = r_begin
    while r0 < r_end:  # (a while loop: runtime-bound for loops fail in the Triton interpreter)
        rows = r0 + tl.arange(0, ROWS)
        rmask = rows < r_end
        zi = _load_z(t_ptr, s_ptr, it_ptr, is_ptr, rows, rmask, ci, dt, ds)
        zj = _load_z(t_ptr, s_ptr, it_ptr, is_ptr, rows, rmask, cj, dt, ds)
        acc += tl.dot(tl.trans(zi), zj, input_precision="ieee")
        r0 += ROWS
    base = part_ptr + split.to(tl.int64) * D_PAD * D_PAD
    tl.store(base + ci[:, None] * D_PAD + cj[None, :], acc)


@triton.jit
def _ftd_grad_kernel(
    t_ptr,
    s_ptr,
    it_ptr,
    is_ptr,
    w_ptr,
    gt_ptr,
    gs_ptr,
    n,
    dt,
    ds,
    D_PAD: tl.constexpr,
    scale,
    WRITE_T: tl.constexpr,
    WRITE_S: tl.constexpr,
    J_LO: tl.constexpr,
    J_HI: tl.constexpr,
    TILE: tl.constexpr,
    ROWS: tl.constexpr,
    KT: tl.constexpr,
):
    # FTD pass 2: dZ = scale * Z W (W = sgn * Q, D_PAD x D_PAD, zero padded), then per part
    # dx_a = inv_a (dZ_a - Z_a <Z_a, dZ_a>). One program per block of ROWS rows; only the column
    # tiles [J_LO, J_HI) that hold a wanted gradient (the student's alone when the teacher is
    # frozen).
    # Registers: ROWS x TILE accumulators; W read from L2. One column tile: one sweep. Several: two
    # sweeps, the first accumulating the per-part row dots <Z_a, dZ_a>, the second recomputing each
    # dZ tile and storing the projected gradient.
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    rmask = rows < n
    r64 = rows.to(tl.int64)
    it = tl.load(it_ptr + rows, mask=rmask, other=0.0)
    is_ = tl.load(is_ptr + rows, mask=rmask, other=0.0)
    dot_t = tl.zeros((ROWS,), dtype=tl.float32)
    dot_s = tl.zeros((ROWS,), dtype=tl.float32)
    if J_HI - J_LO > TILE:
        for j0 in range(J_LO, J_HI, TILE):
            cj = j0 + tl.arange(0, TILE)
            acc = _dz_tile(
                t_ptr, s_ptr, it_ptr, is_ptr, w_ptr, rows, rmask, cj, dt, ds, D_PAD, TILE, ROWS, KT
            )
            prod = _load_z(t_ptr, s_ptr, it_ptr, is_ptr, rows, rmask, cj, dt, ds) * acc
            dot_t += tl.sum(tl.where((cj < dt)[None, :], prod, 0.0), axis=1)
            dot_s += tl.sum(tl.where((cj >= dt)[None, :], prod, 0.0), axis=1)
    for j0 in range(J_LO, J_HI, TILE):
        cj = j0 + tl.arange(0, TILE)
        acc = _dz_tile(
            t_ptr, s_ptr, it_ptr, is_ptr, w_ptr, rows, rmask, cj, dt, ds, D_PAD, TILE, ROWS, KT
        )
        zj = _load_z(t_ptr, s_ptr, it_ptr, is_ptr, rows, rmask, cj, dt, ds)
        if J_HI - J_LO == TILE:  # the only tile: the row dots from it, no second sweep
            prod = zj * acc
            dot_t = tl.sum(tl.where((cj < dt)[None, :], prod, 0.0), axis=1)
            dot_s = tl.sum(tl.where((cj >= dt)[None, :], prod, 0.0), axis=1)
        in_t = cj < dt
        in_s = (cj >= dt) & (cj < dt + ds)
        g = (
            tl.where(
                in_t[None, :],
                it[:, None] * (acc - zj * dot_t[:, None]),
                is_[:, None] * (acc - zj * dot_s[:, None]),
            )
            * scale
        )
        if WRITE_T:
            tl.store(
                gt_ptr + r64[:, None] * dt + cj[None, :],
                g.to(gt_ptr.dtype.element_ty),
                mask=rmask[:, None] & in_t[None, :],
            )
        if WRITE_S:
            tl.store(
                gs_ptr + r64[:, None] * ds + (cj - dt)[None, :],
                g.to(gs_ptr.dtype.element_ty),
                mask=rmask[:, None] & in_s[None, :],
            )


@triton.jit
def _dz_tile(
    t_ptr,
    s_ptr,
    it_ptr,
    is_ptr,
    w_ptr,
    rows,
    rmask,
    cj,
    dt,
    ds,
    D_PAD: tl.constexpr,
    TILE: tl.constexpr,
    ROWS: tl.constexpr,
    KT: tl.constexpr,
):
    # (Z W)[rows, cj]: a [ROWS, TILE] fp32 tile, the k dimension in KT steps.
    acc = tl.zeros((ROWS, TILE), dtype=tl.float32)
    for k0 in range(0, D_PAD, KT):
        ck = k0 + tl.arange(0, KT)
        zk = _load_z(t_ptr, s_ptr, it_ptr, is_ptr, rows, rmask, ck, dt, ds)
        acc += tl.dot(
            zk, tl.load(w_ptr + ck[:, None] * D_PAD + cj[None, :]), input_precision="ieee"
        )
    return acc


def _inv_norms(x):
    n, d = x.shape
    out = torch.empty(n, dtype=torch.float32, device=x.device)
    block_d = min(128, triton.next_power_of_2(max(d, 16)))
    _inv_norm_kernel[(triton.cdiv(n, 32),)](
        x, out, n, d, BLOCK_N=32, BLOCK_D=block_d, ND=triton.cdiv(d, block_d)
    )
    return out


def topology_loss_grads(teacher, student, grad_teacher: bool, grad_student: bool):
    """FTD: (loss [] float32, d loss/d teacher or empty, d loss/d student or empty); see
    kdfast.ops.topology."""
    t, s = teacher.contiguous(), student.contiguous()
    n, dt = t.shape
    ds = s.shape[1]
    gt = torch.empty_like(t) if grad_teacher else t.new_empty(0)
    gs = torch.empty_like(s) if grad_student else s.new_empty(0)
    if n == 0:
        return torch.zeros((), dtype=torch.float32, device=t.device), gt, gs
    it, is_ = _inv_norms(t), _inv_norms(s)
    d_pad = triton.cdiv(dt + ds, _TILE) * _TILE
    n_tiles = d_pad // _TILE
    # ~4 programs per SM on big inputs, at least 8 blocks of rows per split
    pair_i, pair_j, lower = _tile_pairs(n_tiles, t.device)
    n_pairs = pair_i.numel()
    # ~4 programs per SM on big inputs, at least 8 blocks of rows per split
    n_splits = max(1, min(triton.cdiv(n, 8 * _ROWS), max(1, 512 // n_pairs)))
    rows_per_split = triton.cdiv(triton.cdiv(n, n_splits), _ROWS) * _ROWS
    n_splits = triton.cdiv(n, rows_per_split)
    # only the tiles I <= J are written: the others must read as zero in the sum below
    part = torch.zeros((n_splits, d_pad, d_pad), dtype=torch.float32, device=t.device)
    _gram_partial_kernel[(n_splits, n_pairs)](
        t,
        s,
        it,
        is_,
        pair_i,
        pair_j,
        part,
        n,
        dt,
        ds,
        rows_per_split,
        d_pad,
        TILE=_TILE,
        ROWS=_ROWS,
    )
    q = part.sum(0)
    q = q + torch.where(lower, q.t(), 0.0)  # mirror the upper tiles into the lower ones
    w = q * _sign(dt, d_pad, t.device)
    loss = (w.double() * q.double()).sum().float()
    if grad_teacher or grad_student:
        # the column tiles that hold a wanted gradient: teacher columns [0, dt), student
        # [dt, dt + ds)
        j_lo = 0 if grad_teacher else (dt // _TILE) * _TILE
        j_hi = d_pad if grad_student else triton.cdiv(dt, _TILE) * _TILE
        _ftd_grad_kernel[(triton.cdiv(n, _ROWS),)](
            t,
            s,
            it,
            is_,
            w.contiguous(),
            gt,
            gs,
            n,
            dt,
            ds,
            d_pad,
            4.0,
            WRITE_T=grad_teacher,
            WRITE_S=grad_student,
            J_LO=j_lo,
            J_HI=j_hi,
            TILE=_TILE,
            ROWS=_ROWS,
            KT=_KT,
            num_warps=_GRAD_WARPS,
        )
    return loss, gt, gs


@functools.lru_cache(maxsize=16)
def _tile_pairs(n_tiles: int, device: torch.device):
    """The column tile pairs (I, J) with I <= J as two int32 vectors, and the [d_pad, d_pad] mask of
    the strictly lower tiles (I > J), which the Gram kernel leaves to the mirror."""
    ii, jj = torch.triu_indices(n_tiles, n_tiles)
    tile = torch.arange(n_tiles * _TILE) // _TILE
    lower = tile[:, None] > tile[None, :]
    return (ii.to(torch.int32).to(device), jj.to(torch.int32).to(device), lower.to(device))


@triton.jit
def _grouped_kernel(
    t_ptr,
    s_ptr,
    it_ptr,
    is_ptr,
    perm_ptr,
    tile_start_ptr,
    tile_gend_ptr,
    tile_gbeg_ptr,
    loss_ptr,
    count_ptr,
    gs_ptr,
    dt,
    ds,
    FILTER: tl.constexpr,
    WRITE_S: tl.constexpr,
    BLOCK: tl.constexpr,
    CT: tl.constexpr,
    NKT: tl.constexpr,
    DS_PAD: tl.constexpr,
):
    # HTD entity level, one program per a-tile (BLOCK group-sorted rows of one group):
    #   for every b-tile of the same group: C = A_a A_b^T (teacher cosines, dt in CT-wide chunks),
    #   G = B_a B_b^T, m = same tile range [and C > 0], diff = m (G - C);
    #   loss += sum diff^2, count += sum m, gB_a += diff B_b.
    # Then dS_a = inv_a * 4 (gB_a - B_a <B_a, gB_a>), stored at the ORIGINAL row perm[a].
    # Memory: rows are gathered through perm (no sorted copies); registers hold BLOCK x BLOCK
    # cosines, BLOCK x DS_PAD student rows and gradient; one loss/count slot per program (summed
    # afterwards).
    pid = tl.program_id(0)
    a0 = tl.load(tile_start_ptr + pid)
    g_end = tl.load(tile_gend_ptr + pid)
    g_beg = tl.load(tile_gbeg_ptr + pid)
    ia = a0 + tl.arange(0, BLOCK)
    amask = ia < g_end
    ra = tl.load(perm_ptr + ia, mask=amask, other=0).to(tl.int64)
    ita = tl.load(it_ptr + ra, mask=amask, other=0.0)
    isa = tl.load(is_ptr + ra, mask=amask, other=0.0)
    cs = tl.arange(0, DS_PAD)
    smask = cs < ds
    ba = (
        tl.load(
            s_ptr + ra[:, None] * ds + cs[None, :], mask=amask[:, None] & smask[None, :], other=0.0
        ).to(tl.float32)
        * isa[:, None]
    )
    gb = tl.zeros((BLOCK, DS_PAD), dtype=tl.float32)
    lsum = tl.zeros((BLOCK,), dtype=tl.float32)
    cnt = tl.zeros((BLOCK,), dtype=tl.int32)
    b0 = g_beg
    while b0 < g_end:  # (a while loop: runtime-bound for loops fail in the Triton interpreter)
        ib = b0 + tl.arange(0, BLOCK)
        bmask = ib < g_end
        rb = tl.load(perm_ptr + ib, mask=bmask, other=0).to(tl.int64)
        itb = tl.load(it_ptr + rb, mask=bmask, other=0.0)
        isb = tl.load(is_ptr + rb, mask=bmask, other=0.0)
        c = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
        for kc in range(NKT):
            ck = kc * CT + tl.arange(0, CT)
            kmask = ck < dt
            ta = tl.load(
                t_ptr + ra[:, None] * dt + ck[None, :],
                mask=amask[:, None] & kmask[None, :],
                other=0.0,
            )
            tb = tl.load(
                t_ptr + rb[:, None] * dt + ck[None, :],
                mask=bmask[:, None] & kmask[None, :],
                other=0.0,
            )
            # normalised before the product: raw dot products of rows of norm 1e20 overflow
            ta = ta.to(tl.float32) * ita[:, None]
            tb = tb.to(tl.float32) * itb[:, None]
            c += tl.dot(ta, tl.trans(tb), input_precision="ieee")
        bb = (
            tl.load(
                s_ptr + rb[:, None] * ds + cs[None, :],
                mask=bmask[:, None] & smask[None, :],
                other=0.0,
            ).to(tl.float32)
            * isb[:, None]
        )
        gmat = tl.dot(ba, tl.trans(bb), input_precision="ieee")
        m = amask[:, None] & bmask[None, :]
        if FILTER:
            m = m & (c > 0)
        diff = tl.where(m, gmat - c, 0.0)
        lsum += tl.sum(diff * diff, axis=1)
        cnt += tl.sum(m.to(tl.int32), axis=1)
        if WRITE_S:
            gb += tl.dot(diff, bb, input_precision="ieee")
        b0 += BLOCK
    tl.store(loss_ptr + pid, tl.sum(lsum, axis=0))
    tl.store(count_ptr + pid, tl.sum(cnt.to(tl.int64), axis=0))
    if WRITE_S:
        pd = tl.sum(ba * gb, axis=1)
        g = 4.0 * isa[:, None] * (gb - ba * pd[:, None])
        tl.store(
            gs_ptr + ra[:, None] * ds + cs[None, :],
            g.to(gs_ptr.dtype.element_ty),
            mask=amask[:, None] & smask[None, :],
        )


@triton.jit
def _group_gram_kernel(
    t_ptr,
    s_ptr,
    it_ptr,
    is_ptr,
    perm_ptr,
    begin_ptr,
    end_ptr,
    part_ptr,
    dt,
    ds,
    D_PAD: tl.constexpr,
    TILE: tl.constexpr,
    ROWS: tl.constexpr,
):
    # HTD entity level without the teacher-cosine filter, per-group Gram rewrite, pass 1:
    # part[g, I, J] = sum_{a in group g} Z[a, I]^T Z[a, J]  (rows gathered through the group-sorted
    # perm). Grid (n_groups, D_PAD/TILE, D_PAD/TILE); a TILE x TILE fp32 accumulator in registers;
    # each group's Gram is written by exactly one program per tile (no atomics).
    g = tl.program_id(0)
    ci = tl.program_id(1) * TILE + tl.arange(0, TILE)
    cj = tl.program_id(2) * TILE + tl.arange(0, TILE)
    r0 = tl.load(begin_ptr + g)
    r_end = tl.load(end_ptr + g)
    acc = tl.zeros((TILE, TILE), dtype=tl.float32)
    while r0 < r_end:  # (a while loop: runtime-bound for loops fail in the Triton interpreter)
        idx = r0 + tl.arange(0, ROWS)
        rmask = idx < r_end
        rows = tl.load(perm_ptr + idx, mask=rmask, other=0)
        zi = _load_z(t_ptr, s_ptr, it_ptr, is_ptr, rows, rmask, ci, dt, ds)
        zj = _load_z(t_ptr, s_ptr, it_ptr, is_ptr, rows, rmask, cj, dt, ds)
        acc += tl.dot(tl.trans(zi), zj, input_precision="ieee")
        r0 += ROWS
    base = part_ptr + g.to(tl.int64) * D_PAD * D_PAD
    tl.store(base + ci[:, None] * D_PAD + cj[None, :], acc)


@triton.jit
def _group_grad_kernel(
    t_ptr,
    s_ptr,
    it_ptr,
    is_ptr,
    perm_ptr,
    tile_start_ptr,
    tile_gend_ptr,
    tile_group_ptr,
    w_ptr,
    gs_ptr,
    dt,
    ds,
    D_PAD: tl.constexpr,
    J0: tl.constexpr,
    TILE: tl.constexpr,
    ROWS: tl.constexpr,
    KT: tl.constexpr,
):
    # Pass 2: for the ROWS group-sorted rows of one tile, dB = 4 Z W_g[:, student columns] with
    # W_g = sgn * Q_g of the tile's group, then dS_a = inv_a (dB_a - B_a <B_a, dB_a>), stored at
    #     perm[a].
    # The student column tiles [J0, D_PAD), W_g read from L2: one tile, one sweep; several, two
    # sweeps (row dots first, then the stores).
    pid = tl.program_id(0)
    a0 = tl.load(tile_start_ptr + pid)
    g_end = tl.load(tile_gend_ptr + pid)
    grp = tl.load(tile_group_ptr + pid)
    idx = a0 + tl.arange(0, ROWS)
    rmask = idx < g_end
    rows = tl.load(perm_ptr + idx, mask=rmask, other=0)
    r64 = rows.to(tl.int64)
    is_ = tl.load(is_ptr + rows, mask=rmask, other=0.0)
    w_base = w_ptr + grp.to(tl.int64) * D_PAD * D_PAD
    dot_s = tl.zeros((ROWS,), dtype=tl.float32)
    if D_PAD - J0 > TILE:
        for j0 in range(J0, D_PAD, TILE):
            cj = j0 + tl.arange(0, TILE)
            acc = _dz_tile(
                t_ptr, s_ptr, it_ptr, is_ptr, w_base, rows, rmask, cj, dt, ds, D_PAD, TILE, ROWS, KT
            )
            zj = _load_z(t_ptr, s_ptr, it_ptr, is_ptr, rows, rmask, cj, dt, ds)
            dot_s += tl.sum(tl.where((cj >= dt)[None, :], zj * acc, 0.0), axis=1)
    for j0 in range(J0, D_PAD, TILE):
        cj = j0 + tl.arange(0, TILE)
        acc = _dz_tile(
            t_ptr, s_ptr, it_ptr, is_ptr, w_base, rows, rmask, cj, dt, ds, D_PAD, TILE, ROWS, KT
        )
        zj = _load_z(t_ptr, s_ptr, it_ptr, is_ptr, rows, rmask, cj, dt, ds)
        if D_PAD - J0 == TILE:  # the only tile: the row dots from it, no second sweep
            dot_s = tl.sum(tl.where((cj >= dt)[None, :], zj * acc, 0.0), axis=1)
        in_s = (cj >= dt) & (cj < dt + ds)
        g = 4.0 * is_[:, None] * (acc - zj * dot_s[:, None])
        tl.store(
            gs_ptr + r64[:, None] * ds + (cj - dt)[None, :],
            g.to(gs_ptr.dtype.element_ty),
            mask=rmask[:, None] & in_s[None, :],
        )


_BLOCK = 32
# bytes of per-group Grams above which the filter-off case uses the tiled kernel
_GRAM_BUDGET = 64 << 20


@functools.lru_cache(maxsize=16)
def _sign(dt: int, d_pad: int, device: torch.device):
    """[d_pad, d_pad] float32: +1 on the teacher/teacher and student/student blocks, -1 across."""
    sgn = torch.full((d_pad,), -1.0, dtype=torch.float32, device=device)
    sgn[:dt] = 1.0
    return sgn[:, None] * sgn[None, :]


def _group_gram(t, s, it, is_, perm, begins, ends, counts, tiles, n_groups, grad_student, gs):
    n, dt = t.shape
    ds = s.shape[1]
    d_pad = triton.cdiv(dt + ds, _TILE) * _TILE
    n_t = d_pad // _TILE
    part = torch.empty((n_groups, d_pad, d_pad), dtype=torch.float32, device=t.device)
    _group_gram_kernel[(n_groups, n_t, n_t)](
        t, s, it, is_, perm, begins, ends, part, dt, ds, D_PAD=d_pad, TILE=_TILE, ROWS=_ROWS
    )
    w = part * _sign(dt, d_pad, t.device)
    loss = (w.double() * part.double()).sum().float()
    if grad_student:
        tile_start, tile_gend, tile_group = tiles
        _group_grad_kernel[(tile_start.shape[0],)](
            t,
            s,
            it,
            is_,
            perm,
            tile_start,
            tile_gend,
            tile_group,
            w,
            gs,
            dt,
            ds,
            D_PAD=d_pad,
            J0=(dt // _TILE) * _TILE,
            TILE=_TILE,
            ROWS=_BLOCK,
            KT=_KT,
            num_warps=_GRAD_WARPS,
        )
    return loss, (counts * counts).sum()


def grouped_topology_loss_grads(
    teacher, student, groups, n_groups: int, teacher_cos_filter: bool, grad_student: bool
):
    """HTD entity level: (loss [] float32, count [] int64, d loss/d student or empty)."""
    t, s = teacher.contiguous(), student.contiguous()
    n, dt = t.shape
    ds = s.shape[1]
    gs = torch.empty_like(s) if grad_student else s.new_empty(0)
    if n == 0:
        return (
            torch.zeros((), dtype=torch.float32, device=t.device),
            torch.zeros((), dtype=torch.int64),
            gs,
        )
    perm = torch.argsort(groups, stable=True).contiguous()
    counts = torch.bincount(groups, minlength=n_groups)
    ends = torch.cumsum(counts, 0)
    begins = ends - counts
    tiles_per_group = (counts + _BLOCK - 1) // _BLOCK
    tile_group = torch.repeat_interleave(torch.arange(n_groups, device=t.device), tiles_per_group)
    first_tile = torch.cumsum(tiles_per_group, 0) - tiles_per_group
    local = torch.arange(tile_group.shape[0], device=t.device) - first_tile[tile_group]
    tile_start = (begins[tile_group] + local * _BLOCK).contiguous()
    tile_gend = ends[tile_group].contiguous()
    tile_gbeg = begins[tile_group].contiguous()
    n_tiles = tile_start.shape[0]
    it, is_ = _inv_norms(t), _inv_norms(s)
    d_pad = triton.cdiv(dt + ds, _TILE) * _TILE
    if not teacher_cos_filter and n_groups * d_pad * d_pad * 4 <= _GRAM_BUDGET:
        loss, count = _group_gram(
            t,
            s,
            it,
            is_,
            perm,
            begins.contiguous(),
            ends.contiguous(),
            counts,
            (tile_start, tile_gend, tile_group.contiguous()),
            n_groups,
            grad_student,
            gs,
        )
        return loss, count, gs
    loss_part = torch.empty(n_tiles, dtype=torch.float32, device=t.device)
    count_part = torch.empty(n_tiles, dtype=torch.int64, device=t.device)
    _grouped_kernel[(n_tiles,)](
        t,
        s,
        it,
        is_,
        perm,
        tile_start,
        tile_gend,
        tile_gbeg,
        loss_part,
        count_part,
        gs,
        dt,
        ds,
        FILTER=bool(teacher_cos_filter),
        WRITE_S=grad_student,
        BLOCK=_BLOCK,
        CT=64,
        NKT=triton.cdiv(dt, 64),
        DS_PAD=max(16, triton.next_power_of_2(ds)),
        num_warps=8,
    )  # spilled at dt=200 (sm_90): 680 bytes on 4 warps, 8 on 8
    return loss_part.double().sum().float(), count_part.sum(), gs
