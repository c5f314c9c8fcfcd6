"""Local shards, the collectives selection needs, and what DDP and FSDP2 support.

The lowest layer of piece_optim's distributed support: the mask, the optimizer and the
estimator import it, and :mod:`piece_optim.distributed` (the public features: masks across
ranks, the sparse DDP all-reduce, checkpoints) builds on it and re-exports its public
helpers.  It imports no other module of piece_optim but :mod:`piece_optim._indices`.

One rule holds everywhere: a :class:`~piece_optim.SparseMask` names flat positions in the
full (unsharded) parameter.  Under FSDP2 (``fully_shard``) parameters are DTensors
sharded on dim 0 (``Shard(0)`` on a 1-D mesh, torch.chunk sizes, so shards may be uneven
or empty); each rank works on ``param.to_local()`` (:func:`local_tensor`) and maps global
positions to its shard (:func:`shard_indices`) and back (:func:`global_indices`).

What DDP and FSDP2 support: the one place that decides it
---------------------------------------------------------
Layouts: FSDP2's only (``Shard(0)`` on one 1-D mesh, every parameter sharded:
:func:`sharded_group`).  The checks live here and nowhere else: :func:`estimator_group`
(``ImportanceEstimator``), :func:`refuse_sparse_grads` (``SparseAdamW``),
:func:`manual_average_group` and :func:`check_sparse_allreduce_wrapper` (the Hugging Face
integration).

``ImportanceEstimator(in_backward=True)`` and ``SparseAdamW(sparse_grads=True)`` exist to
avoid holding a full set of gradients.  Under DDP that memory cannot be avoided: the
reducer keeps flat bucket buffers for every gradient for the model's lifetime (with
``gradient_as_bucket_view=True`` ``p.grad`` *is* that buffer), and their post-accumulate
hooks run before the reducer copies the gradient into its bucket, so they would see the
local, un-averaged gradient and starve DDP of it.  Under FSDP2 the reduce-scattered
gradient shards are written to ``p.grad`` outside autograd, as views into one flat
buffer per ``fully_shard`` group, so those hooks never fire on the sharded parameters.
Both flags are therefore refused under DDP and FSDP2, with the equivalent that works:
``collect()`` after each backward gives the same terms (and, under DDP, the global-batch
mask); with :func:`sparse_allreduce_hook` the gradient outside the selected entries is
zero, so ``opt.clip_grad_norm_`` / ``torch.nn.utils.clip_grad_norm_`` measure exactly the
selected-entries norm that ``sparse_grads=True`` clips.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ._indices import index_dtype_for

try:  # torch builds without distributed support still import piece_optim
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    _HAVE_DIST = dist.is_available()
except ImportError:  # pragma: no cover - only on torch builds without distributed
    _HAVE_DIST = False
    dist = Shard = None  # type: ignore[assignment]
    DTensor = ()  # type: ignore[assignment,misc]  # isinstance(x, ()) is always False


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 parameter or gradient)."""
    return _HAVE_DIST and isinstance(t, DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor (a view sharing its storage); any other tensor as is."""
    return t.to_local() if is_dtensor(t) else t


def is_ddp(model: nn.Module) -> bool:
    """Whether ``model`` is wrapped in ``DistributedDataParallel``."""
    if not _HAVE_DIST:
        return False
    from torch.nn.parallel import DistributedDataParallel

    return isinstance(model, DistributedDataParallel)


def _check_layout(p: Tensor) -> None:
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise NotImplementedError(
            f"parameter sharded as {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh: "
            "piece_optim supports FSDP2's layout only (Shard(0) on a 1-D mesh); use "
            "fully_shard(model) without HSDP / tensor parallelism"
        )


def sharded_group(params: Sequence[Tensor]) -> Any | None:
    """The process group the DTensor params are sharded over, or None if none is a DTensor.

    Only the FSDP2 layout is supported: ``Shard(0)`` on one 1-D mesh for every param.
    """
    group, mesh, plain = None, None, 0
    for p in params:
        if not is_dtensor(p):
            plain += 1
            continue
        _check_layout(p)
        if mesh is None:
            mesh, group = p.device_mesh, p.device_mesh.get_group()
        elif p.device_mesh != mesh:
            raise NotImplementedError("parameters are sharded over different device meshes")
    if mesh is not None and plain:
        # A plain param next to sharded ones holds an un-reduced local gradient on each
        # rank, and its (replicated) scores would enter the summed histograms once per rank.
        raise NotImplementedError(
            f"{plain} parameter(s) are plain tensors next to FSDP2 (DTensor) ones: apply "
            "fully_shard to the root module too (fully_shard(model)), so every parameter "
            "is sharded"
        )
    return group


def shard_range(p: Tensor) -> tuple[int, int]:
    """``(start, stop)``: the flat positions of the full ``p`` that this rank's shard holds.

    ``(0, p.numel())`` for a plain tensor.  Under FSDP2 (``Shard(0)``) the local shard is
    whole rows, contiguous in the full parameter's flat order.
    """
    if not is_dtensor(p):
        return 0, p.numel()
    _check_layout(p)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local_shape, offset = compute_local_shape_and_global_offset(
        p.shape, p.device_mesh, p.placements
    )
    row = 1
    for s in p.shape[1:]:
        row *= int(s)
    n = 1
    for s in local_shape:
        n *= int(s)
    start = int(offset[0]) * row if p.dim() else 0
    if n != local_tensor(p).numel():  # never seen; guards a change in torch's layout rules
        raise RuntimeError(
            f"DTensor layout: computed a local shard of {n} entries, the shard holds "
            f"{local_tensor(p).numel()}"
        )
    return start, start + n


def shard_indices(p: Tensor, idx: Tensor) -> Tensor:
    """The part of a global mask entry ``idx`` (sorted flat positions in the full ``p``)
    that falls in this rank's shard, as flat positions into ``p.to_local()``.

    ``idx`` itself for a plain tensor.  Called once per parameter when the optimizer is
    built; O(log k) to find the range (``idx`` is sorted) plus one copy of this rank's
    part.
    """
    if not is_dtensor(p):
        return idx
    start, stop = shard_range(p)
    bounds = torch.tensor([start, stop], dtype=idx.dtype, device=idx.device)
    lo, hi = (int(b) for b in torch.searchsorted(idx, bounds))
    return (idx[lo:hi] - start).to(index_dtype_for(stop - start)).contiguous()


def global_indices(p: Tensor, local_idx: Tensor) -> Tensor:
    """Inverse of :func:`shard_indices`: local shard positions -> positions in the full ``p``,
    in the index dtype the full parameter needs."""
    start, _ = shard_range(p)
    dtype = index_dtype_for(p.numel())
    return local_idx.to(dtype) + start if start else local_idx.to(dtype)


def gather_global_indices(
    params: Sequence[Tensor], local_idx: Sequence[Tensor], group: Any
) -> list[Tensor]:
    """Every rank's selected local positions of ``params`` as one global mask, on every rank.

    ``local_idx[i]``: sorted positions into ``params[i].to_local()``.  Returns, per param,
    the sorted global flat positions selected on any rank.  Two collectives in all (the
    per-param counts, then the positions padded to the largest rank's total), ~4 B per
    selected entry per rank.
    """
    world = dist.get_world_size(group)
    glob = [global_indices(p, i).to(torch.int64) for p, i in zip(params, local_idx, strict=True)]
    device = glob[0].device if glob else torch.device("cpu")
    counts = torch.tensor([g.numel() for g in glob], dtype=torch.int64, device=device)
    all_counts = [torch.empty_like(counts) for _ in range(world)]
    dist.all_gather(all_counts, counts, group=group)
    sizes = [[int(c) for c in rc.tolist()] for rc in all_counts]
    longest = max(sum(s) for s in sizes)
    flat = torch.zeros(longest, dtype=torch.int64, device=device)
    if glob:
        mine = torch.cat(glob)
        flat[: mine.numel()] = mine
    parts = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(parts, flat, group=group)
    per_rank = [part[: sum(s)].split(s) for part, s in zip(parts, sizes, strict=True)]
    # Rank r's rows come after rank r-1's (Shard(0)), so concatenating in rank order keeps
    # each param's positions sorted.
    return [
        torch.cat([per_rank[r][i] for r in range(world)]).to(index_dtype_for(p.numel()))
        for i, p in enumerate(params)
    ]


def estimator_group(model: nn.Module, params: Sequence[Tensor], in_backward: bool) -> Any | None:
    """The FSDP2 group an ImportanceEstimator's params are sharded over (None if not).

    ``in_backward=True`` is refused under DDP and FSDP2; see this module's docstring.
    """
    group = sharded_group(params)
    if in_backward and group is not None:
        raise NotImplementedError(
            "ImportanceEstimator(in_backward=True) is not supported under FSDP2: FSDP2 writes "
            "the reduce-scattered gradient shards outside autograd, where the hooks cannot "
            "see them. Use in_backward=False and call collect() after each backward() (the "
            "same terms; FSDP2 already holds only 1/world of the gradients)"
        )
    if in_backward and is_ddp(model):
        raise NotImplementedError(
            "ImportanceEstimator(in_backward=True) is not supported under DDP: its hooks run "
            "before DDP averages a gradient (they would fold the local one), and DDP keeps a "
            "full-size gradient bucket anyway, so in_backward would save no memory. Use "
            "in_backward=False and call collect() after each backward() (same terms, "
            "averaged over the ranks)"
        )
    return group


def refuse_sparse_grads(params: Sequence[Tensor]) -> None:
    """Raise if ``SparseAdamW(sparse_grads=True)`` gets DDP or FSDP2 parameters.

    Decision and reasons: this module's docstring ("What the distributed paths refuse").
    """
    if any(is_dtensor(p) for p in params):
        raise NotImplementedError(
            "SparseAdamW(sparse_grads=True) does not support FSDP2 (DTensor) parameters: "
            "FSDP2 writes the reduce-scattered gradient shards outside autograd, where the "
            "sparse-gradient hooks cannot see them. Use sparse_grads=False (the default) with "
            "FSDP2; its gradients already take 1/world of the memory"
        )
    if _HAVE_DIST and dist.is_initialized() and dist.get_world_size() > 1:
        raise NotImplementedError(
            "SparseAdamW(sparse_grads=True) is single-process only: under DDP its hooks would "
            "take each gradient before DDP averages it, and DDP's gradient buckets keep the "
            "full-size gradient anyway, so nothing would be freed. Use sparse_grads=False "
            "with ddp_model.register_comm_hook(opt, piece_optim.distributed."
            "sparse_allreduce_hook): it sends only the selected entries and zeroes the rest, "
            "so clipping sees the same selected-entries norm as sparse_grads=True"
        )


def topk_hooks(group: Any | None) -> dict[str, Callable]:
    """``reduce_hist`` / ``share_ties`` for :func:`piece_optim._select.global_topk`.

    ``{}`` when ``group`` is None (one process, or DDP where every rank holds the same
    scores).
    """
    if group is None:
        return {}

    def reduce_hist(hist: Tensor) -> None:
        dist.all_reduce(hist, op=dist.ReduceOp.SUM, group=group)

    def share_ties(local_eq: list[int], take_eq: int) -> list[int]:
        # Hand the tied slots out in single-process order: tensor, then rank (Shard(0)
        # puts rank r's rows after rank r-1's), then flat index inside the shard.
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        mine = torch.tensor(local_eq, dtype=torch.int64)
        counts = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(counts, mine, group=group)
        quota = []
        for i in range(len(local_eq)):
            for r in range(world):
                q = min(int(counts[r][i]), take_eq)
                take_eq -= q
                if r == rank:
                    quota.append(q)
        return quota

    return {"reduce_hist": reduce_hist, "share_ties": share_ties}


def manual_average_group(model: nn.Module) -> Any | None:
    """The default group when a plain module's gradients must be averaged by hand (several
    ranks, the model neither DDP-wrapped nor FSDP2-sharded: e.g. inside
    ``Trainer.create_optimizer``, before DDP wraps it), else None."""
    if not (_HAVE_DIST and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if is_ddp(model) or any(is_dtensor(p) for p in model.parameters()):
        return None
    return dist.group.WORLD


def check_sparse_allreduce_wrapper(model: nn.Module) -> bool:
    """Whether the sparse all-reduce hook applies to ``model`` (DDP); None of the work
    in one process; raises for another wrapper over several ranks (FSDP, DeepSpeed)."""
    if is_ddp(model):
        return True
    if _HAVE_DIST and dist.is_initialized() and dist.get_world_size() > 1:
        raise NotImplementedError(
            f"the sparse all-reduce works under DDP only; the model is wrapped in "
            f"{type(model).__name__}"
        )
    return False
