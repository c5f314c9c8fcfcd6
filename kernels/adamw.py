"""Fused sparse AdamW step: gather, update fp32 moments, decoupled decay, scatter.

For the k selected entries ``idx`` of a parameter (all entries when idx is None) one
program per 1024 entries reads ``g[idx]`` (or the k-long sparse gradient), the fp32
moments and the weights (the fp32 master copy for bf16/fp16 params), and writes back the
moments, the master and the parameter entries.  Entries outside ``idx`` are never touched.

Operation order is that of :func:`piece_optim._reference.adamw_step_` as torch's CPU
kernels compute it, so the result is bit-identical there (checked under the
interpreter): ``w *= fp32(1 - lr*wd)``; ``m = fma(c, g - m, base)`` (torch's vectorised
``lerp``: ``c = 1-beta1, base = m`` when ``1-beta1 < 0.5``, else ``c = -beta1, base = g``);
``v = fma(fp32(1-beta2) * g, g, v * beta2)`` (``addcmul``); ``denom = sqrt_rn(v) /
fp32(sqrt(bc2)) + eps``; ``w += (fp32(-lr/bc1) * m) / denom`` (``addcdiv``).  Scalars are
rounded to fp32 once, on the host, as torch does with Python scalars.  torch's CUDA
kernels order some of these differently (addcdiv as ``w + s * (m / d)``, division by a
scalar as multiplication by its reciprocal), so on GPUs the kernel and the reference on
the same GPU may differ by an ulp or two per step; both are fp32 roundings of one formula.

lr, betas, eps, weight decay and the step are runtime arguments: a new lr or step never
recompiles.  Bytes per selected entry (fp32 param, int32 idx, dense grad): idx 4 + g 4 +
m 8 + v 8 + w 8 = 32 B; bf16/fp16 params with master: idx 4 + g 2 + m 8 + v 8 + master 8
+ param write 2 = 32 B; dense (idx None) fp32: 28 B.

Many tensors: the ones with at most ``BATCH_NUMEL`` selected entries that share dtypes and
step share one launch through a device table of pointers; larger ones launch alone.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl
from torch import Tensor

from ._jit_utils import from_f32, launch_opts, to_f32

BLOCK = 1024
BATCH_NUMEL = 1 << 20
_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
       torch.int32: tl.int32, torch.int64: tl.int64}  # fmt: skip


@triton.jit
def _adamw_block(p_ptr, g_ptr, i_ptr, m_ptr, v_ptr, w_ptr, err_ptr, offs, mask, numel, decay,
                 lerp_c, lerp_small, beta2, one_m_beta2, bc2_sqrt, eps, neg_step_size,
                 HAS_IDX: tl.constexpr, GRAD_SPARSE: tl.constexpr,
                 HAS_MASTER: tl.constexpr):  # fmt: skip
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
def _adamw_kernel(p_ptr, g_ptr, i_ptr, m_ptr, v_ptr, w_ptr, err_ptr, n, numel, decay, lerp_c,
                  lerp_small, beta2, one_m_beta2, bc2_sqrt, eps, neg_step_size,
                  HAS_IDX: tl.constexpr, GRAD_SPARSE: tl.constexpr, HAS_MASTER: tl.constexpr,
                  BLOCK: tl.constexpr):  # fmt: skip
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    _adamw_block(p_ptr, g_ptr, i_ptr, m_ptr, v_ptr, w_ptr, err_ptr, offs, offs < n, numel,
                 decay, lerp_c, lerp_small, beta2, one_m_beta2, bc2_sqrt, eps, neg_step_size,
                 HAS_IDX, GRAD_SPARSE, HAS_MASTER)  # fmt: skip


@triton.jit
def _adamw_many_kernel(table_ptr, prog_tensor_ptr, prog_start_ptr, err_ptr, decay, lerp_c,
                       lerp_small, beta2, one_m_beta2, bc2_sqrt, eps, neg_step_size,
                       P_DTYPE: tl.constexpr, G_DTYPE: tl.constexpr, I_DTYPE: tl.constexpr,
                       HAS_IDX: tl.constexpr, GRAD_SPARSE: tl.constexpr,
                       HAS_MASTER: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
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
    _adamw_block(p_ptr, g_ptr, i_ptr, m_ptr, v_ptr, w_ptr, err_ptr, offs, offs < n, numel,
                 decay, lerp_c, lerp_small, beta2, one_m_beta2, bc2_sqrt, eps, neg_step_size,
                 HAS_IDX, GRAD_SPARSE, HAS_MASTER)  # fmt: skip


def _f32(x: float) -> float:
    return float(np.float32(x))


def step_scalars(lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
                 step: int) -> tuple:  # fmt: skip
    """The kernel's scalar arguments, rounded to fp32 exactly where torch rounds them."""
    if step < 1:
        raise ValueError(f"step={step} must be >= 1 (the first step is 1)")
    w1 = np.float32(1 - beta1)  # lerp weight, as torch casts it
    small = abs(float(w1)) < 0.5
    lerp_c = float(w1) if small else float(w1 - np.float32(1.0))
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    return (_f32(1 - lr * weight_decay), lerp_c, int(small), _f32(beta2), _f32(1 - beta2),
            _f32(math.sqrt(bc2)), _f32(eps), _f32(-(lr / bc1)))  # fmt: skip


def _flat(p: Tensor, g: Tensor, idx: Tensor | None, m: Tensor, v: Tensor, w: Tensor | None,
          grad_is_sparse: bool) -> tuple:  # fmt: skip
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


def adamw_triton(param: Tensor, grad: Tensor, idx: Tensor | None, exp_avg: Tensor,
                 exp_avg_sq: Tensor, master: Tensor | None, *, lr: float, beta1: float,
                 beta2: float, eps: float, weight_decay: float, step: int,
                 grad_is_sparse: bool = False, err: Tensor | None = None) -> None:  # fmt: skip
    """One AdamW step on the entries ``idx`` of ``param`` (see the module doc).

    An index outside ``[0, param.numel())`` is skipped (nothing read or written for that
    entry) and sets ``err[0]`` to 1 (an int32 tensor on the param's device).  Without
    ``err`` the launcher uses its own flag and raises IndexError after the launch.
    """
    p, g, i, m, v, w, k = _flat(param, grad, idx, exp_avg, exp_avg_sq, master, grad_is_sparse)
    if k == 0:
        return
    flag, own = _err_flag(err, p.device)
    sc = step_scalars(lr, beta1, beta2, eps, weight_decay, step)
    _adamw_kernel[(triton.cdiv(k, BLOCK),)](
        p, g, i if i is not None else m, m, v, w if w is not None else m, flag, k, p.numel(),
        *sc, HAS_IDX=i is not None, GRAD_SPARSE=bool(grad_is_sparse) and i is not None,
        HAS_MASTER=w is not None, BLOCK=BLOCK, **launch_opts(p),
    )  # fmt: skip
    if own:
        _raise_if_flagged(flag)


def adamw_many_triton(params: Sequence[Tensor], grads: Sequence[Tensor],
                      idxs: Sequence[Tensor | None], exp_avgs: Sequence[Tensor],
                      exp_avg_sqs: Sequence[Tensor], masters: Sequence[Tensor | None],
                      steps: Sequence[int], *, lr: float, beta1: float, beta2: float,
                      eps: float, weight_decay: float, grad_is_sparse: bool = False,
                      err: Tensor | None = None) -> None:  # fmt: skip
    """:func:`adamw_triton` over many tensors; small ones with equal dtypes and step share
    one launch.  Every tensor is validated before the first launch; ``err`` as in
    :func:`adamw_triton` (all tensors on one device when it is given)."""
    hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    groups: dict[tuple, list[tuple]] = {}
    alone: list[tuple] = []
    flags: dict[torch.device, tuple[Tensor, bool]] = {}
    for args in zip(params, grads, idxs, exp_avgs, exp_avg_sqs, masters, steps, strict=True):
        *tensors, step = args
        flat = _flat(*tensors, grad_is_sparse)
        k = flat[-1]
        if k == 0:
            continue
        p, g, i, _, _, w, _ = flat
        if p.device not in flags:
            flags[p.device] = _err_flag(err, p.device)
        if k > BATCH_NUMEL:
            alone.append((tensors, step))
            continue
        key = (p.device, p.dtype, g.dtype, None if i is None else i.dtype, w is not None,
               int(step))  # fmt: skip
        groups.setdefault(key, []).append((tensors, flat))
    for tensors, step in alone:
        adamw_triton(
            *tensors,
            step=step,
            grad_is_sparse=grad_is_sparse,
            err=flags[tensors[0].device][0],
            **hyper,
        )
    for (device, pdt, gdt, idt, has_w, step), items in groups.items():
        flag = flags[device][0]
        if len(items) == 1:
            adamw_triton(*items[0][0], step=step, grad_is_sparse=grad_is_sparse, err=flag, **hyper)
            continue
        table, prog_t, prog_s = [], [], []
        for t, (_, (p, g, i, m, v, w, k)) in enumerate(items):
            table += [
                p.data_ptr(),
                g.data_ptr(),
                (i if i is not None else m).data_ptr(),
                m.data_ptr(),
                v.data_ptr(),
                (w if w is not None else m).data_ptr(),
                k,
                p.numel(),
            ]
            starts = range(0, k, BLOCK)
            prog_t += [t] * len(starts)
            prog_s += list(starts)
        # Freeing these tables (and any contiguous() copies) right after the launch is safe:
        # the caching allocator hands their memory only to later work on the same stream.
        tab = torch.tensor(table, dtype=torch.int64).to(device, non_blocking=True)
        pt = torch.tensor(prog_t, dtype=torch.int64).to(device, non_blocking=True)
        ps = torch.tensor(prog_s, dtype=torch.int64).to(device, non_blocking=True)
        sc = step_scalars(step=step, **hyper)
        _adamw_many_kernel[(len(prog_t),)](
            tab, pt, ps, flag, *sc, P_DTYPE=_TL[pdt], G_DTYPE=_TL[gdt],
            I_DTYPE=_TL[idt] if idt is not None else tl.int32, HAS_IDX=idt is not None,
            GRAD_SPARSE=bool(grad_is_sparse) and idt is not None, HAS_MASTER=has_w,
            BLOCK=BLOCK, **launch_opts(items[0][1][0]),
        )  # fmt: skip
    for flag, own in flags.values():
        if own:
            _raise_if_flagged(flag)
