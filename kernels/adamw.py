"""Fused sparse AdamW step: gather, update fp32 moments, decoupled decay, scatter.

For the k selected entries ``idx`` of a parameter (all entries when idx is None) one
program per 1024 entries reads ``g[idx]`` (or the k-long sparse gradient), the fp32
moments and the weights (the fp32 master copy for bf16/fp16 params), and writes back the
moments, the master and the parameter entries.  Entries outside ``idx`` are never touched.

Operation order is that of :func:`piece_optim.backends.reference.adamw_step_` as torch's
CPU kernels compute it: ``w *= fp32(decay)``; ``m = fma(c, g - m, base)`` (torch's
vectorised ``lerp``: ``c = 1-beta1, base = m`` when ``1-beta1 < 0.5``, else ``c = -beta1,
base = g``); ``v = fma(fp32(1-beta2) * g, g, v * beta2)`` (``addcmul``); ``denom =
sqrt_rn(v) / fp32(sqrt(bc2)) + eps``; ``w += (fp32(-lr/bc1) * m) / denom`` (``addcdiv``).
The scalars come made (``reference.adamw_scalars``: torch's doubles) and are rounded to
fp32 once, on the host, as torch does with Python scalars (:func:`kernel_scalars`).

How close to torch: the moments are bit-identical to the reference on CPU tensors (under
the interpreter), and so are the weights wherever the reference's square root is IEEE
(``sqrt_rn``).  torch's vectorised CPU ``sqrt`` is not: with MKL (torch's x86 builds) it
is VML's, accurate to 1 ulp but not correctly rounded (measured: 17% of random inputs
differ from IEEE), so against torch's CPU AdamW a weight may differ in its last bit
(measured: 84 of 200,000 after one step, each by 1 ulp; the reference computed with IEEE
sqrt equals the kernel on all of them).  The C++ kernels call VML's sqrt themselves and
are bit-identical.  torch's CUDA kernels order some operations differently (addcdiv as
``w + s * (m / d)``, division by a scalar as multiplication by its reciprocal), so on GPUs
the kernel and the reference on the same GPU may differ by an ulp or two per step; both
are fp32 roundings of one formula.

lr, betas, eps, weight decay and the step are runtime arguments: a new lr or step never
recompiles.  Bytes per selected entry (fp32 param, int32 idx, dense grad): idx 4 + g 4 +
m 8 + v 8 + w 8 = 32 B; bf16/fp16 params with master: idx 4 + g 2 + m 8 + v 8 + master 8
+ param write 2 = 32 B; dense (idx None) fp32: 28 B.

Many tensors: the ones with at most ``BATCH_NUMEL`` selected entries that share dtypes and
scalars (the step) share one launch through a device table of pointers
(``_jit_utils.batch_tables``); larger ones launch alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._jit_utils import TL_DTYPES, batch_tables, from_f32, launch_opts, to_f32

BLOCK = 1024
BATCH_NUMEL = 1 << 20


@triton.jit
def _adamw_block(
    p_ptr,
    g_ptr,
    i_ptr,
    m_ptr,
    v_ptr,
    w_ptr,
    err_ptr,
    offs,
    mask,
    numel,
    decay,
    lerp_c,
    lerp_small,
    beta2,
    one_m_beta2,
    bc2_sqrt,
    eps,
    neg_step_size,
    HAS_IDX: tl.constexpr,
    GRAD_SPARSE: tl.constexpr,
    HAS_MASTER: tl.constexpr,
):
    if HAS_IDX:
        pos = tl.load(i_ptr + offs, mask=mask, other=0).to(tl.int64)
        # Bounds: an index outside [0, numel) is skipped (nothing read or written for that
        # entry) and flags err_ptr[0]; the launcher turns the flag into an error.
        bad = mask & ((pos < 0) | (pos >= numel))
        tl.store(err_ptr + tl.zeros_like(pos), tl.full(pos.shape, 1, tl.int32), mask=bad)
        mask = mask & ~bad
    else:
        pos = offs
    if GRAD_SPARSE:
        g = to_f32(tl.load(g_ptr + offs, mask=mask, other=0.0))
    else:
        g = to_f32(tl.load(g_ptr + pos, mask=mask, other=0.0))
    if HAS_MASTER:
        w = tl.load(w_ptr + offs, mask=mask, other=0.0)
    else:
        w = to_f32(tl.load(p_ptr + pos, mask=mask, other=0.0))
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    v = tl.load(v_ptr + offs, mask=mask, other=0.0)

    w = w * decay
    m = tl.fma(lerp_c, g - m, tl.where(lerp_small != 0, m, g))
    v = tl.fma(one_m_beta2 * g, g, v * beta2)
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    w = w + tl.div_rn(neg_step_size * m, denom)

    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(v_ptr + offs, v, mask=mask)
    if HAS_MASTER:
        tl.store(w_ptr + offs, w, mask=mask)
    tl.store(p_ptr + pos, from_f32(w, p_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_kernel(
    p_ptr,
    g_ptr,
    i_ptr,
    m_ptr,
    v_ptr,
    w_ptr,
    err_ptr,
    n,
    numel,
    decay,
    lerp_c,
    lerp_small,
    beta2,
    one_m_beta2,
    bc2_sqrt,
    eps,
    neg_step_size,
    HAS_IDX: tl.constexpr,
    GRAD_SPARSE: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _adamw_block(
        p_ptr,
        g_ptr,
        i_ptr,
        m_ptr,
        v_ptr,
        w_ptr,
        err_ptr,
        offs,
        offs < n,
        numel,
        decay,
        lerp_c,
        lerp_small,
        beta2,
        one_m_beta2,
        bc2_sqrt,
        eps,
        neg_step_size,
        HAS_IDX,
        GRAD_SPARSE,
        HAS_MASTER,
    )


@triton.jit
def _adamw_many_kernel(
    table_ptr,
    prog_tensor_ptr,
    prog_start_ptr,
    err_ptr,
    decay,
    lerp_c,
    lerp_small,
    beta2,
    one_m_beta2,
    bc2_sqrt,
    eps,
    neg_step_size,
    P_DTYPE: tl.constexpr,
    G_DTYPE: tl.constexpr,
    I_DTYPE: tl.constexpr,
    HAS_IDX: tl.constexpr,
    GRAD_SPARSE: tl.constexpr,
    HAS_MASTER: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(prog_tensor_ptr + pid)
    start = tl.load(prog_start_ptr + pid)
    row = table_ptr + t * 8  # [param, grad, idx, m, v, master, n, param numel]
    p_ptr = tl.load(row).to(tl.pointer_type(P_DTYPE))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(G_DTYPE))
    i_ptr = tl.load(row + 2).to(tl.pointer_type(I_DTYPE))
    m_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    w_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 6)
    numel = tl.load(row + 7)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    _adamw_block(
        p_ptr,
        g_ptr,
        i_ptr,
        m_ptr,
        v_ptr,
        w_ptr,
        err_ptr,
        offs,
        offs < n,
        numel,
        decay,
        lerp_c,
        lerp_small,
        beta2,
        one_m_beta2,
        bc2_sqrt,
        eps,
        neg_step_size,
        HAS_IDX,
        GRAD_SPARSE,
        HAS_MASTER,
    )


def _f32(x: float) -> float:
    return float(np.float32(x))


def kernel_scalars(sc: object) -> tuple:
    """The kernel's scalar arguments from an ``AdamWScalars`` (``piece_optim.backends.
    reference.adamw_scalars``: torch's doubles), rounded to fp32 exactly where torch rounds
    them, and torch's choice between the two forms of ``lerp``."""
    w1 = np.float32(sc.lerp_weight)  # lerp weight, as torch casts it
    small = abs(float(w1)) < 0.5
    lerp_c = float(w1) if small else float(w1 - np.float32(1.0))
    return (
        _f32(sc.decay),
        lerp_c,
        int(small),
        _f32(sc.beta2),
        _f32(sc.sq_weight),
        _f32(sc.bc2_sqrt),
        _f32(sc.eps),
        _f32(-sc.step_size),
    )


def _flat(
    p: Tensor,
    g: Tensor,
    idx: Tensor | None,
    m: Tensor,
    v: Tensor,
    w: Tensor | None,
    grad_is_sparse: bool,
) -> tuple:
    if p.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"param dtype {p.dtype} is not supported: use fp32, bf16 or fp16")
    if g.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"grad dtype {g.dtype} is not supported: use fp32, bf16 or fp16")
    k = p.numel() if idx is None else idx.numel()
    pf = p.view(-1)
    gf = g.reshape(-1).contiguous()
    want_g = k if (grad_is_sparse or idx is None) else p.numel()
    if gf.numel() != want_g:
        raise ValueError(f"grad has {gf.numel()} elements, expected {want_g}")
    for name, t in (("exp_avg", m), ("exp_avg_sq", v), ("master", w)):
        if t is None:
            continue
        if t.dtype != torch.float32 or not t.is_contiguous() or t.numel() != k:
            raise ValueError(f"{name} must be a contiguous fp32 tensor of {k} elements")
    if idx is not None:
        if idx.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"idx must be int32 or int64, got {idx.dtype}")
        idx = idx.reshape(-1).contiguous()
    return pf, gf, idx, m.view(-1), v.view(-1), None if w is None else w.view(-1), k


def _err_flag(err: Tensor | None, device: torch.device) -> tuple[Tensor, bool]:
    """The int32 flag the kernels set for a skipped out-of-range index, and whether this
    call owns it (then the launcher checks it itself, at the cost of a read)."""
    if err is None:
        return torch.zeros(1, dtype=torch.int32, device=device), True
    if err.dtype != torch.int32 or err.numel() < 1 or err.device != device:
        raise ValueError(f"err must be an int32 tensor on {device}")
    return err, False


def _raise_if_flagged(err: Tensor) -> None:
    if int(err[0]):
        raise IndexError(
            "adamw_triton: an index outside its parameter was skipped (nothing outside the "
            "parameter was read or written; the other entries were updated)"
        )


def adamw_triton(
    param: Tensor,
    grad: Tensor,
    idx: Tensor | None,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    master: Tensor | None,
    scalars: object,
    *,
    grad_is_sparse: bool = False,
    err: Tensor | None = None,
) -> None:
    """One AdamW step on the entries ``idx`` of ``param`` (see the module doc); ``scalars``
    is an ``AdamWScalars``.

    An index outside ``[0, param.numel())`` is skipped (nothing read or written for that
    entry) and sets ``err[0]`` to 1 (an int32 tensor on the param's device).  Without
    ``err`` the launcher uses its own flag and raises IndexError after the launch.
    """
    p, g, i, m, v, w, k = _flat(param, grad, idx, exp_avg, exp_avg_sq, master, grad_is_sparse)
    if k == 0:
        return
    flag, own = _err_flag(err, p.device)
    _adamw_kernel[(triton.cdiv(k, BLOCK),)](
        p,
        g,
        i if i is not None else m,
        m,
        v,
        w if w is not None else m,
        flag,
        k,
        p.numel(),
        *kernel_scalars(scalars),
        HAS_IDX=i is not None,
        GRAD_SPARSE=bool(grad_is_sparse) and i is not None,
        HAS_MASTER=w is not None,
        BLOCK=BLOCK,
        **launch_opts(p),
    )
    if own:
        _raise_if_flagged(flag)


def adamw_many_triton(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    idxs: Sequence[Tensor | None],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    masters: Sequence[Tensor | None],
    scalars: Sequence[object],
    *,
    grad_is_sparse: bool = False,
    err: Tensor | None = None,
) -> None:
    """:func:`adamw_triton` over many tensors; small ones with equal dtypes and scalars
    share one launch.  Every tensor is validated before the first launch; ``err`` as in
    :func:`adamw_triton` (all tensors on one device when it is given)."""
    groups: dict[tuple, list[tuple]] = {}
    alone: list[tuple] = []
    flags: dict[torch.device, tuple[Tensor, bool]] = {}
    for args in zip(params, grads, idxs, exp_avgs, exp_avg_sqs, masters, scalars, strict=True):
        *tensors, sc = args
        flat = _flat(*tensors, grad_is_sparse)
        k = flat[-1]
        if k == 0:
            continue
        p, g, i, _, _, w, _ = flat
        if p.device not in flags:
            flags[p.device] = _err_flag(err, p.device)
        if k > BATCH_NUMEL:
            alone.append((tensors, sc))
            continue
        key = (
            p.device,
            p.dtype,
            g.dtype,
            None if i is None else i.dtype,
            w is not None,
            kernel_scalars(sc),
        )
        groups.setdefault(key, []).append((tensors, sc, flat))
    for tensors, sc in alone:
        adamw_triton(*tensors, sc, grad_is_sparse=grad_is_sparse, err=flags[tensors[0].device][0])
    for (device, pdt, gdt, idt, has_w, ksc), items in groups.items():
        flag = flags[device][0]
        if len(items) == 1:
            adamw_triton(*items[0][0], items[0][1], grad_is_sparse=grad_is_sparse, err=flag)
            continue
        rows = [
            [
                p.data_ptr(),
                g.data_ptr(),
                (i if i is not None else m).data_ptr(),
                m.data_ptr(),
                v.data_ptr(),
                (w if w is not None else m).data_ptr(),
                k,
                p.numel(),
            ]
            for _, _, (p, g, i, m, v, w, k) in items
        ]
        tab, pt, ps = batch_tables(rows, [it[2][-1] for it in items], BLOCK, device)
        _adamw_many_kernel[(pt.numel(),)](
            tab,
            pt,
            ps,
            flag,
            *ksc,
            P_DTYPE=TL_DTYPES[pdt],
            G_DTYPE=TL_DTYPES[gdt],
            I_DTYPE=TL_DTYPES[idt] if idt is not None else tl.int32,
            HAS_IDX=idt is not None,
            GRAD_SPARSE=bool(grad_is_sparse) and idt is not None,
            HAS_MASTER=has_w,
            BLOCK=BLOCK,
            **launch_opts(items[0][2][0]),
        )
    for flag, own in flags.values():
        if own:
            _raise_if_flagged(flag)
