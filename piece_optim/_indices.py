"""Flat index tensors: the dtype convention and the checks every owner of indices runs.

Indices are sorted unique flat positions (``param.view(-1)``), int32 unless the tensor is
too large to address with them (2**31 entries or more: int64).  Masks, deltas, the
optimizer and the estimator all follow this; :mod:`piece_optim.mask` re-exports it.
"""

from __future__ import annotations

import torch
from torch import Tensor


def index_dtype_for(numel: int) -> torch.dtype:
    """int32 indices unless the tensor is too large to address with them."""
    return torch.int64 if numel >= 2**31 else torch.int32


_UNSIGNED = tuple(
    getattr(torch, n) for n in ("uint8", "uint16", "uint32", "uint64") if hasattr(torch, n)
)


def validate_indices(idx: Tensor, numel: int, what: str) -> Tensor:
    """Check ``idx`` is a 1-D integer tensor of sorted unique indices into ``numel`` entries.

    Returns a new, private tensor of the canonical index dtype (int32, int64 for tensors
    of 2**31 entries or more), contiguous, on ``idx``'s device: never the caller's tensor,
    so editing the caller's tensor later cannot change (or push out of range) what the
    owner of the result indexes.  Any integer dtype is accepted, unsigned ones included
    (checked as int64: a difference of uint8 values wraps).  Raises ValueError naming
    ``what`` otherwise.
    """
    if not isinstance(idx, Tensor):
        idx = torch.as_tensor(idx)
    if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
        raise ValueError(f"{what}: indices must be an integer tensor, got dtype {idx.dtype}")
    if idx.dim() != 1:
        raise ValueError(f"{what}: indices must be 1-D flat indices, got shape {tuple(idx.shape)}")
    if idx.device.type == "meta":
        raise ValueError(f"{what}: indices are on the meta device (no values to check)")
    if idx.dtype in _UNSIGNED:
        # torch has no min/max/sub for uint16/32/64; uint64 above 2**63 turns negative
        # here, and the range check below refuses it
        idx = idx.to(torch.int64)
    if idx.numel():
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= numel:
            raise ValueError(
                f"{what}: index out of range [0, {numel}) (min {lo}, max {hi}); indices are "
                "flat positions into the parameter (param.view(-1))"
            )
        if idx.numel() > 1:
            d = idx[1:] - idx[:-1]
            if bool((d == 0).any()):
                raise ValueError(f"{what}: duplicated indices; pass sorted unique indices")
            if bool((d < 0).any()):
                raise ValueError(f"{what}: indices are not sorted; pass torch.sort(idx).values")
    return idx.to(index_dtype_for(numel), memory_format=torch.contiguous_format, copy=True)


def union_indices(a: Tensor, b: Tensor, numel: int) -> Tensor:
    """Sorted unique union of two index tensors into ``numel`` entries (canonical dtype)."""
    u = torch.unique(torch.cat([a.to(torch.int64), b.to(torch.int64).to(a.device)]))
    return u.to(index_dtype_for(numel)).contiguous()
