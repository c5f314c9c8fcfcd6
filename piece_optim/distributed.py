"""Distributed training: DDP and FSDP2, on PyTorch's own collectives only.

DDP
---
Every rank holds the whole model and DDP averages the gradients, so an
:class:`~piece_optim.ImportanceEstimator` on each rank folds the same gradients and
selects the same mask.  :func:`assert_same_mask` checks that (one all_gather of a
checksum); :func:`broadcast_mask` instead computes the mask once and sends it.

FSDP2 (``torch.distributed.fsdp.fully_shard``)
---------------------------------------------
Parameters are DTensors sharded on dim 0 (``Shard(0)`` on a 1-D mesh).  Design:

* the estimator accumulates the *local shard* of each gradient (``grad.to_local()``),
  so its memory is 1/world of the model's;
* ``select()`` builds its histograms over local scores and sums them with one
  ``all_reduce`` per level (2 x 512 KiB of int64), so every rank finds the same global
  threshold; each rank then keeps the indices into *its own shard*.  When the threshold
  value is tied across ranks, the per-tensor counts of tied entries are all-gathered and
  handed out in the single-process order (tensor order, then rank = dim-0 order, then
  flat index), so the union of the ranks' masks is exactly the mask one process would
  select, and exactly k entries in total;
* the resulting :class:`~piece_optim.SparseMask` is in local-shard coordinates: its
  shapes are the local shard shapes, its indices flat positions into
  ``param.to_local().view(-1)``; ``numel_total()`` stays the global total, so use
  :func:`numel_selected_global` for the global count;
* :class:`~piece_optim.SparseAdamW` steps on the local shards
  (``param.to_local()``, ``param.grad.to_local()``) with those indices;
* :func:`sharded_optimizer_state_dict` / :func:`load_sharded_optimizer_state_dict` give
  a state_dict that ``torch.distributed.checkpoint`` saves and loads: each rank's sparse
  state sits under its own ``rank<r>`` key (the state is per shard, not a slice of one
  global tensor), so nothing is deduplicated away.  A checkpoint resumes on the same
  world size and mask, which is what a local-shard mask implies.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from .mask import SparseMask
    from .optim import SparseAdamW

try:  # torch builds without distributed support still import piece_optim
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Shard

    _HAVE_DIST = dist.is_available()
except ImportError:  # pragma: no cover - only on torch builds without distributed
    _HAVE_DIST = False
    DTensor = ()  # type: ignore[assignment,misc]  # isinstance(x, ()) is always False


# -- local shards (used by importance.py and optim.py) ----------------------------------------
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


def sharded_group(params: Sequence[Tensor]) -> Any | None:
    """The process group the DTensor params are sharded over, or None if none is a DTensor.

    Only the FSDP2 layout is supported: ``Shard(0)`` on one 1-D mesh for every DTensor.
    """
    group, mesh = None, None
    for p in params:
        if not is_dtensor(p):
            continue
        if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
            raise NotImplementedError(
                f"parameter sharded as {tuple(p.placements)} on a {p.device_mesh.ndim}-D mesh: "
                "piece_optim supports FSDP2's layout only (Shard(0) on a 1-D mesh); use "
                "fully_shard(model) without HSDP / tensor parallelism"
            )
        if mesh is None:
            mesh, group = p.device_mesh, p.device_mesh.get_group()
        elif p.device_mesh != mesh:
            raise NotImplementedError("parameters are sharded over different device meshes")
    return group


def estimator_group(model: nn.Module, params: Sequence[Tensor], in_backward: bool) -> Any | None:
    """The FSDP2 group an ImportanceEstimator's params are sharded over (None if not).

    ``in_backward=True`` folds each gradient when autograd accumulates it, which is
    before DDP averages it across ranks (measured: the ranks' masks then differ), and
    FSDP2 writes its reduced gradient shards outside autograd: both would score the wrong
    gradients, so both are refused.
    """
    group = sharded_group(params)
    if in_backward and (group is not None or is_ddp(model)):
        raise NotImplementedError(
            "in_backward=True is not supported under DDP or FSDP2: the hooks would fold "
            "gradients before they are reduced across ranks. Use in_backward=False and "
            "collect() after each backward()"
        )
    return group


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


# -- masks across ranks ------------------------------------------------------------------------
def _default_group(group: Any | None) -> Any | None:
    if not (_HAVE_DIST and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: call torch.distributed.init_process_group() "
            "first (e.g. launch with torchrun)"
        )
    return group


def mask_checksum(mask: SparseMask) -> str:
    """A SHA-256 hex digest of a mask's names (in order), shapes, total and indices."""
    h = hashlib.sha256()
    h.update(str(mask.numel_total()).encode())
    for name in mask.names():
        idx = mask[name].detach().cpu().to(torch.int64).contiguous()
        h.update(f"|{name}|{mask.shape(name)}|{idx.numel()}|".encode())
        h.update(idx.numpy().tobytes())
    return h.hexdigest()


def assert_same_mask(mask: SparseMask, group: Any | None = None) -> None:
    """Raise on every rank if the ranks' masks differ (DDP: they must be identical)."""
    group = _default_group(group)
    sums: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(sums, mask_checksum(mask), group=group)
    if len(set(sums)) != 1:
        bad = [r for r, s in enumerate(sums) if s != sums[0]]
        raise RuntimeError(
            f"SparseMask differs across ranks (ranks {bad} differ from rank 0): the ranks "
            "estimated importance on different gradients. Estimate on the DDP-wrapped model "
            "(gradients averaged) or compute the mask once and use broadcast_mask()"
        )


def broadcast_mask(mask: SparseMask | None, src: int = 0, group: Any | None = None) -> SparseMask:
    """Send rank ``src``'s mask to every rank (others pass anything, e.g. None)."""
    from .mask import SparseMask

    group = _default_group(group)
    payload: list[Any] = [None]
    if dist.get_rank(group) == src:
        if not isinstance(mask, SparseMask):
            raise TypeError(f"broadcast_mask: rank {src} must pass a SparseMask, got {mask!r}")
        payload = [(
            {n: mask[n].cpu() for n in mask.names()},
            {n: mask.shape(n) for n in mask.names()},
            mask.numel_total(),
        )]  # fmt: skip
    src_global = dist.get_global_rank(group, src) if group is not None else src
    dist.broadcast_object_list(payload, src=src_global, group=group)
    idx, shapes, total = payload[0]
    return SparseMask(idx, shapes, total)


def numel_selected_global(mask: SparseMask, group: Any | None = None) -> int:
    """Entries selected over all ranks: the sum of the local-shard masks' counts (FSDP2).

    Under DDP every rank holds the whole mask, so use ``mask.numel_selected()`` there.
    """
    group = _default_group(group)
    n = torch.tensor([mask.numel_selected()], dtype=torch.int64)
    dist.all_reduce(n, group=group)
    return int(n.item())


# -- checkpointing (FSDP2 + torch.distributed.checkpoint) -------------------------------------
def _rank_key() -> str:
    return f"rank{dist.get_rank()}" if _HAVE_DIST and dist.is_initialized() else "rank0"


def _named_state(opt: SparseAdamW, model: nn.Module) -> dict[str, Tensor]:
    names = {p: n for n, p in model.named_parameters()}
    out = {}
    for p in opt.selected_params():
        if p not in names:
            raise ValueError("the optimizer holds a parameter that is not in model")
        out[names[p]] = p
    return out


def sharded_optimizer_state_dict(opt: SparseAdamW, model: nn.Module) -> dict[str, Any]:
    """A state_dict of ``opt`` for ``torch.distributed.checkpoint.save``.

    ``{"rank<r>": {param_name: {"idx", "exp_avg", "exp_avg_sq", "step"[, "master"]}},
    "param_groups": [...]}``.  Params with no state yet get fresh zero state, so the same
    call on a new optimizer gives the structure ``dcp.load`` fills in place.
    """
    state: dict[str, dict[str, Tensor]] = {}
    for name, p in _named_state(opt, model).items():
        st = opt.state[p] or opt._init_state(p)
        state[name] = {k: v for k, v in st.items() if isinstance(v, Tensor)}
    groups = [{k: v for k, v in g.items() if k not in ("params", "param_names")}
              for g in opt.param_groups]  # fmt: skip
    return {_rank_key(): state, "param_groups": groups}


def load_sharded_optimizer_state_dict(
    opt: SparseAdamW, model: nn.Module, state_dict: dict[str, Any]
) -> None:
    """Put a state_dict from :func:`sharded_optimizer_state_dict` (after ``dcp.load``) back.

    The saved indices must equal the optimizer's mask (same world size, same mask).
    """
    mine = state_dict[_rank_key()]
    params = _named_state(opt, model)
    if set(mine) != set(params):
        raise ValueError(
            f"checkpoint has state for {sorted(mine)[:3]}..., this optimizer trains "
            f"{sorted(params)[:3]}...: it was made with a different mask (or world size)"
        )
    for name, st in mine.items():
        p = params[name]
        cur = opt.state[p] or opt._init_state(p)
        if "idx" in st and not torch.equal(st["idx"].to(cur["idx"]), cur["idx"]):
            raise ValueError(
                f"checkpoint for {name!r} was made with a different mask (or world size)"
            )
        for k, v in st.items():
            if k != "idx":
                cur[k] = v.detach().clone().to(cur[k])
    for g, saved in zip(opt.param_groups, state_dict["param_groups"], strict=True):
        g.update(saved)
