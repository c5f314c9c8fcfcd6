"""Distributed training: DDP and FSDP2, on PyTorch's own collectives only.

One rule holds everywhere: a :class:`~piece_optim.SparseMask` names flat positions in the
full (unsharded) parameter, whatever produced it, and every rank holds the same mask.  So
a mask made on N ranks, or by one process, trains on M ranks, and a checkpoint saved on N
ranks resumes on M.

DDP
---
Every rank holds the whole model and DDP averages the gradients, so an
:class:`~piece_optim.ImportanceEstimator` on each rank folds the same gradients and
selects the same mask.  :func:`assert_same_mask` checks that (one all_gather of a
checksum); :func:`broadcast_mask` instead computes the mask once and sends it.

:func:`sparse_allreduce_hook` is a DDP communication hook
(``ddp_model.register_comm_hook(opt, sparse_allreduce_hook)``, PyTorch's mechanism, as
PowerSGD uses it): per gradient bucket it gathers the entries the optimizer trains,
all-reduces only those (averaged like DDP) and writes them back, so a step sends about
``ratio`` of plain DDP's bytes.  See its docstring for what it does with frozen entries,
clipping and gradient accumulation.

FSDP2 (``torch.distributed.fsdp.fully_shard``)
---------------------------------------------
Parameters are DTensors sharded on dim 0 (``Shard(0)`` on a 1-D mesh, torch.chunk
sizes, so shards may be uneven or empty).  Design:

* the estimator accumulates the *local shard* of each gradient (``grad.to_local()``),
  so its memory is 1/world of the model's;
* ``select()`` builds its histograms over local scores and sums them with one
  ``all_reduce`` per level (2 x 512 KiB of int64), so every rank finds the same global
  threshold.  When the threshold value is tied across ranks, the per-tensor counts of
  tied entries are all-gathered and handed out in the single-process order (tensor order,
  then rank = dim-0 order, then flat index).  Each rank then shifts its local picks to
  global positions and the ranks all-gather them (:func:`gather_global_indices`, two
  collectives of ~4 B per selected entry), so every rank returns the mask one process
  would select, bit for bit: global shapes, global indices, ``numel_selected()`` = k;
* :class:`~piece_optim.SparseAdamW` maps each mask entry to its own shard when it is
  built (:func:`shard_indices`) and steps on the local shards;
* :func:`sharded_optimizer_state_dict` / :func:`load_sharded_optimizer_state_dict` give
  a state_dict for ``torch.distributed.checkpoint`` in global coordinates: the sparse
  state of a parameter (indices, moments, master copy) is one 1-D tensor of its k global
  entries, which the ranks hold in contiguous pieces (Shard(0) keeps rank r's rows after
  rank r-1's, so its selected entries too), saved as one tensor with those
  offsets (a DTensor over ``LocalShardsWrapper`` pieces); dense state is a DTensor placed
  like its parameter.  DCP reshards both, so
  the checkpoint loads on any world size, or into a plain model in one process.

What DDP and FSDP2 support, and why the rest is refused: :mod:`piece_optim._dtensor`
(the one place that decides it).
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._dtensor import (
    _HAVE_DIST,
    DTensor,
    Shard,
    dist,
    gather_global_indices,
    global_indices,
    is_ddp,
    is_dtensor,
    local_tensor,
    shard_indices,
    shard_range,
    sharded_group,
    topk_hooks,
)
from ._indices import index_dtype_for
from .mask import SparseMask
from .optim import SparseAdamW

__all__ = [
    "CommStats",
    "SparseAllreduceState",
    "assert_same_mask",
    "broadcast_mask",
    "comm_stats",
    "gather_global_indices",
    "global_indices",
    "is_ddp",
    "is_dtensor",
    "load_sharded_optimizer_state_dict",
    "local_tensor",
    "mask_checksum",
    "numel_selected_global",
    "shard_indices",
    "shard_range",
    "sharded_group",
    "sharded_optimizer_state_dict",
    "sparse_allreduce_hook",
    "topk_hooks",
]


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
    """Raise on every rank if the ranks' masks differ (they must be identical)."""
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
    group = _default_group(group)
    payload: list[Any] = [None]
    if dist.get_rank(group) == src:
        if not isinstance(mask, SparseMask):
            raise TypeError(f"broadcast_mask: rank {src} must pass a SparseMask, got {mask!r}")
        payload = [
            (
                {n: mask[n].cpu() for n in mask.names()},
                {n: mask.shape(n) for n in mask.names()},
                mask.numel_total(),
            )
        ]
    src_global = dist.get_global_rank(group, src) if group is not None else src
    dist.broadcast_object_list(payload, src=src_global, group=group)
    idx, shapes, total = payload[0]
    return SparseMask(idx, shapes, total)


def numel_selected_global(mask: SparseMask, group: Any | None = None) -> int:
    """Deprecated: masks are global now, so this is ``mask.numel_selected()``."""
    warnings.warn(
        "numel_selected_global(mask) is deprecated: a SparseMask holds global positions on "
        "every rank (FSDP2 included), so use mask.numel_selected()",
        DeprecationWarning,
        stacklevel=2,
    )
    return mask.numel_selected()


# -- DDP: all-reduce only the selected gradient entries ---------------------------------------
@dataclass
class CommStats:
    """What :func:`sparse_allreduce_hook` sent, counted on this rank since the last reset.

    ``bytes_sent``: bytes this rank handed to ``all_reduce`` (the payload; a ring
    all-reduce moves about twice that over each link).  ``bytes_dense``: what plain DDP
    would have all-reduced for the same buckets (their full size).  ``buckets``: hook calls.
    """

    bytes_sent: int = 0
    bytes_dense: int = 0
    buckets: int = 0

    def reset(self) -> None:
        self.bytes_sent = self.bytes_dense = self.buckets = 0


class SparseAllreduceState:
    """State of :func:`sparse_allreduce_hook`: the optimizer, the process group, counters.

    ``ddp.register_comm_hook(opt, sparse_allreduce_hook)`` makes one for the default
    group; pass ``SparseAllreduceState(opt, process_group=g)`` as the hook state when DDP
    runs on another group.  ``stats`` is a :class:`CommStats`.
    """

    def __init__(self, optimizer: SparseAdamW, process_group: Any | None = None) -> None:
        # weak: the per-optimizer cache (a WeakKeyDictionary) maps the optimizer to this
        # state, and a strong reference back would keep both alive forever
        self._optimizer = weakref.ref(optimizer)
        self.process_group = process_group
        self.stats = CommStats()
        # (bucket index, param ids) -> positions to reduce (None: the whole bucket).  DDP
        # rebuilds its buckets once after the first iteration, hence the param ids.
        self._plans: dict[tuple, Tensor | None] = {}

    @property
    def optimizer(self) -> SparseAdamW:
        opt = self._optimizer()
        if opt is None:
            raise RuntimeError("sparse_allreduce_hook: the optimizer was garbage-collected")
        return opt

    def _group(self) -> Any:
        return self.process_group if self.process_group is not None else dist.group.WORLD

    def plan(self, bucket: Any) -> Tensor | None:
        params = bucket.parameters()
        key = (bucket.index(), tuple(id(p) for p in params))
        if key not in self._plans:
            self._plans[key] = self._make_plan(bucket, params)
        return self._plans[key]

    def _make_plan(self, bucket: Any, params: list[Tensor]) -> Tensor | None:
        opt = self.optimizer
        buf = bucket.buffer()
        held = {id(p) for g in opt.param_groups for p in g["params"]}
        selection = _trained_entries(opt)
        pieces, whole = [], True
        for p, g in zip(params, bucket.gradients(), strict=True):
            off, n = g.storage_offset() - buf.storage_offset(), g.numel()
            idx = selection.get(p, False) if id(p) in held else None
            if idx is None:  # trained densely, or not this optimizer's: DDP's full average
                pieces.append(torch.arange(off, off + n, device=buf.device))
            elif idx is False:  # frozen by the mask: nothing sent, gradient left at zero
                whole = False
            else:
                pieces.append(idx.to(device=buf.device, dtype=torch.int64) + off)
                whole = whole and idx.numel() == n
        if whole:
            plan = None
        elif pieces:
            plan = torch.cat(pieces)
        else:
            plan = torch.empty(0, dtype=torch.int64, device=buf.device)
        self._check_same_plan(bucket.index(), buf, plan)
        return plan

    def _check_same_plan(self, index: int, buf: Tensor, plan: Tensor | None) -> None:
        # Ranks with different masks would all-reduce tensors of different lengths (a
        # hang or an opaque gloo/NCCL error) or mix up entries: check once per bucket
        # layout, with one all_reduce of 4 int64s.
        n = buf.numel() if plan is None else plan.numel()
        s = -1 if plan is None else int(plan.sum()) + int((plan % 65521).pow(2).sum())
        t = torch.tensor([n, -n, s, -s], dtype=torch.int64, device=buf.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._group())
        if t.tolist() != [n, -n, s, -s]:
            raise RuntimeError(
                f"sparse_allreduce_hook: the ranks train different entries of gradient bucket "
                f"{index} (this rank: {n} entries): every rank must hold the same mask. Check "
                "with piece_optim.distributed.assert_same_mask(mask), or send one with "
                "broadcast_mask()"
            )


def _trained_entries(opt: SparseAdamW) -> dict[Tensor, Tensor | None]:
    """``{param: sorted flat indices (None: every entry)}`` of what ``opt`` trains.

    Params ``opt`` holds but leaves out are frozen by its mask.  Under DDP there are no
    shards, so the optimizer's (local) indices are the mask's.
    """
    return opt._selection


_STATES: weakref.WeakKeyDictionary[Any, SparseAllreduceState] = weakref.WeakKeyDictionary()


def _hook_state(state: Any) -> SparseAllreduceState:
    if isinstance(state, SparseAllreduceState):
        return state
    if not isinstance(state, SparseAdamW):
        raise TypeError(
            "sparse_allreduce_hook: register it with the SparseAdamW as state, "
            "ddp_model.register_comm_hook(opt, sparse_allreduce_hook), or a "
            f"SparseAllreduceState(opt, process_group); got {type(state).__name__}"
        )
    if state not in _STATES:
        _STATES[state] = SparseAllreduceState(state)
    return _STATES[state]


def comm_stats(state: Any) -> CommStats:
    """The :class:`CommStats` of the hook registered with ``state`` (an optimizer or a
    :class:`SparseAllreduceState`); zeros before the first backward."""
    return _hook_state(state).stats


def sparse_allreduce_hook(state: Any, bucket: Any) -> torch.futures.Future[Tensor]:
    """DDP communication hook that all-reduces only the gradient entries the optimizer trains.

    Register it with the optimizer as its state::

        ddp_model.register_comm_hook(opt, piece_optim.distributed.sparse_allreduce_hook)

    Per bucket: the positions of the trained entries (the mask's indices of each param,
    shifted to the param's place in the bucket) are gathered into one compact tensor,
    divided by the world size and all-reduced (DDP's own averaging, in the gradient's
    dtype, bf16 included), then written back; every other entry of the bucket is set to
    zero.  So ``p.grad`` after backward equals plain DDP's at the trained entries (bit for
    bit with world 2) and is 0 elsewhere.  What is sent, per param in the bucket:

    * selected by the mask: its selected entries;
    * frozen by the mask (held by the optimizer, no entry): nothing;
    * trained densely (``mask=None``) or not held by this optimizer (e.g. trained by
      another optimizer): everything, so a bucket of those is plain DDP.

    Gradient accumulation works as with plain DDP: under ``ddp_model.no_sync()`` DDP
    calls no hook and the local gradients add up; the first synchronised backward sends
    the accumulated sums.  Frozen entries' gradients being zero (not this rank's local
    value) keeps the ranks identical; a clip over the model's gradients then measures the
    selected entries' norm, the norm ``sparse_grads=True`` clips in one process (the
    unselected entries' global gradient is never communicated, so no rank knows it).

    Every rank must hold the same mask; the first call per bucket layout checks that
    with one all_reduce of 4 integers, and raises on every rank if not.  Bytes sent:
    :func:`comm_stats`.
    """
    st = _hook_state(state)
    group = st._group()
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    plan = st.plan(bucket)
    st.stats.buckets += 1
    st.stats.bytes_dense += buf.numel() * buf.element_size()
    if plan is None:  # exactly default_hooks.allreduce_hook
        st.stats.bytes_sent += buf.numel() * buf.element_size()
        buf.div_(world)
        fut = dist.all_reduce(buf, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0])
    if plan.numel() == 0:  # every param of this bucket frozen: nothing to send
        buf.zero_()
        done: torch.futures.Future[Tensor] = torch.futures.Future()
        done.set_result(buf)
        return done
    # Divide first, as DDP does, so low-precision sums do not overflow.
    compact = buf.index_select(0, plan).div_(world)
    st.stats.bytes_sent += compact.numel() * compact.element_size()

    def write_back(f: torch.futures.Future) -> Tensor:
        buf.zero_()
        buf.index_copy_(0, plan, f.value()[0])
        return buf

    return dist.all_reduce(compact, group=group, async_op=True).get_future().then(write_back)


if _HAVE_DIST:
    # DDP.register_comm_hook compares the hook's annotations with the real objects, and
    # ``from __future__ import annotations`` leaves strings there.
    sparse_allreduce_hook.__annotations__.update(
        bucket=dist.GradBucket, state=Any, **{"return": torch.futures.Future[Tensor]}
    )


# -- checkpointing (torch.distributed.checkpoint, any world size) -----------------------------
_STATE_KEYS = ("exp_avg", "exp_avg_sq", "master")


def _param_names(opt: SparseAdamW, model: nn.Module) -> list[tuple[str, Tensor]]:
    """``(name, param)`` for every param ``opt`` holds, in the optimizer's order."""
    names = {p: n for n, p in model.named_parameters()}
    out = []
    for g in opt.param_groups:
        for p in g["params"]:
            if p not in names:
                raise ValueError("the optimizer holds a parameter that is not in model")
            out.append((names[p], p))
    return out


def _layout(opt: SparseAdamW, params: list[tuple[str, Tensor]]) -> list[list[int]]:
    """Per rank of the shards' group, per param: ``[k_local (-1: dense, -2: none), step]``.

    One all_gather when the params are FSDP2 shards; this rank's row alone otherwise
    (a plain param is whole on every rank).  The step is the largest seen on any rank:
    a rank whose shard holds no selected entry keeps no state (and no step) for a param.
    """
    selection = _trained_entries(opt)
    rows = []
    for _, p in params:
        if p not in selection:
            rows.append([-2, 0])
            continue
        idx = selection[p]
        st = opt.state.get(p) or {}
        step = int(st["step"]) if "step" in st else 0
        rows.append([-1 if idx is None else int(idx.numel()), step])
    group = sharded_group([p for _, p in params])
    if group is None:
        return [rows]
    mine = torch.tensor(rows, dtype=torch.int64).reshape(len(rows), 2)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(every, mine, group=group)
    return [e.tolist() for e in every]


def _sharded_vector(local: Tensor, offset: int, total: int, mesh: Any) -> Tensor:
    """A 1-D DTensor of ``total`` entries of which this rank holds ``local`` (shared, not
    copied), starting at ``offset``: pieces of any length, in rank order.

    DTensor's own ``Shard(0)`` fixes torch.chunk sizes, so the local tensor is wrapped in
    ``LocalShardsWrapper``, the checkpoint protocol (``__create_write_items__``,
    ``__create_chunk_list__``, ``__get_tensor_shard__``) that DTensor hands DCP to for
    shards at arbitrary offsets (torchrec's row-wise optimizer state uses it the same way).
    No collective: the offsets come from the gathered layout.
    """
    from torch.distributed.tensor._shards_wrapper import LocalShardsWrapper

    wrapped = LocalShardsWrapper([local], [(offset,)])
    return DTensor.from_local(
        wrapped, mesh, (Shard(0),), run_check=False, shape=torch.Size([total]), stride=(1,)
    )


def sharded_optimizer_state_dict(opt: SparseAdamW, model: nn.Module) -> dict[str, Any]:
    """``opt``'s state for ``torch.distributed.checkpoint``, in global coordinates.

    ``{"state": {param_name: {"idx", "exp_avg", "exp_avg_sq", "step"[, "master"]}},
    "param_groups": [...]}``.  For a param trained sparsely, each of ``idx`` (global flat
    positions), ``exp_avg``, ``exp_avg_sq`` and ``master`` is one 1-D tensor over the
    param's k selected entries: a plain tensor for a plain param, a DTensor
    whose pieces are the ranks' own state (no copy) under FSDP2 (see
    :func:`_sharded_vector`).  A densely trained
    param's moments are shaped like it (a DTensor placed like it under FSDP2).  Params
    with no state yet get fresh zero state, so the same call on a new optimizer gives the
    structure ``dcp.load`` fills in place (then call
    :func:`load_sharded_optimizer_state_dict`).  Collective under FSDP2 (call it on every
    rank): one all_gather of two integers per param.
    """
    params = _param_names(opt, model)
    layout = _layout(opt, params)
    group = sharded_group([p for _, p in params])
    state: dict[str, dict[str, Any]] = {}
    for i, (name, p) in enumerate(params):
        kinds = [rows[i][0] for rows in layout]
        if all(k == -2 for k in kinds):
            continue  # frozen everywhere
        step = max(rows[i][1] for rows in layout)
        entry: dict[str, Any] = {"step": torch.tensor(float(step))}
        st = (opt.state[p] or opt.ensure_state(p)) if p in _trained_entries(opt) else {}
        if group is None:  # whole params: the state is the global state
            entry.update({k: v for k, v in st.items() if k in _STATE_KEYS or k == "idx"})
        elif -1 in kinds:  # dense under FSDP2: moments shaped like the shard
            for k in _STATE_KEYS:
                if k in st:
                    entry[k] = DTensor.from_local(
                        st[k], p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                    )
        else:
            # the ranks' pieces of the k selected entries, in rank (= global) order
            sizes = [max(rows[i][0], 0) for rows in layout]
            me = dist.get_rank(group)
            offset, total = sum(sizes[:me]), sum(sizes)
            dev = p.device
            idx = (
                global_indices(p, st["idx"])
                if st
                else torch.empty(0, dtype=index_dtype_for(p.numel()), device=dev)
            )
            entry["idx"] = _sharded_vector(idx, offset, total, p.device_mesh)
            for k in _STATE_KEYS:
                if k == "master" and not opt._use_master(p):
                    continue
                v = st[k] if st else torch.zeros(0, dtype=torch.float32, device=dev)
                entry[k] = _sharded_vector(v, offset, total, p.device_mesh)
        state[name] = entry
    groups = [
        {k: v for k, v in g.items() if k not in ("params", "param_names")} for g in opt.param_groups
    ]
    return {"state": state, "param_groups": groups}


def _local_part(v: Any) -> Tensor | None:
    """This rank's piece of a state_dict value (see :func:`_sharded_vector`)."""
    if is_dtensor(v):
        v = v.to_local()
        if hasattr(v, "local_shards"):  # LocalShardsWrapper
            shards = v.local_shards()
            return shards[0] if shards else None
    return v


def load_sharded_optimizer_state_dict(
    opt: SparseAdamW, model: nn.Module, state_dict: dict[str, Any]
) -> None:
    """Put a state_dict from :func:`sharded_optimizer_state_dict` (after ``dcp.load``) back.

    The checkpoint may come from any world size (or one process): DCP reshards.  Its
    mask must be this optimizer's (the saved global indices are compared with this
    rank's; a different k already fails in ``dcp.load`` with "Size mismatch").
    """
    if "state" not in state_dict:
        raise ValueError(
            "this state_dict is not from sharded_optimizer_state_dict() of this version (keys "
            f"{sorted(state_dict)[:3]}); older checkpoints kept per-rank state and must be "
            "loaded by the version that wrote them"
        )
    saved = state_dict["state"]
    params = dict(_param_names(opt, model))
    selection = _trained_entries(opt)
    missing = [n for n, p in params.items() if p in selection and n not in saved]
    extra = [n for n in saved if n not in params]
    if missing or extra:
        raise ValueError(
            f"the checkpoint has no state for {missing[:3]} and state for unknown {extra[:3]}: "
            "it was made with a different mask (or model)"
        )
    for name, entry in saved.items():
        p = params[name]
        if p not in selection:
            if _local_part(entry.get("idx")) is not None and _local_part(entry["idx"]).numel():
                raise ValueError(
                    f"the checkpoint trains entries of {name!r}, which this optimizer's mask "
                    "freezes: it was made with a different mask"
                )
            continue  # FSDP2: no selected entry in this rank's shard
        cur = opt.state[p] or opt.ensure_state(p)
        if "idx" in cur:
            got = _local_part(entry.get("idx"))
            want = global_indices(p, cur["idx"])
            if got is None or got.shape != want.shape or not torch.equal(got.to(want), want):
                raise ValueError(f"checkpoint for {name!r} was made with a different mask")
        for k in _STATE_KEYS:
            if k not in cur:
                continue
            v = _local_part(entry[k]) if k in entry else None
            if v is None or v.numel() != cur[k].numel():
                raise ValueError(f"checkpoint for {name!r} has no matching {k!r} for this rank")
            if v.data_ptr() != cur[k].data_ptr():  # dcp.load filled our own tensors already
                cur[k].copy_(v.reshape(cur[k].shape))
        cur["step"] = entry["step"].detach().to(torch.float32).cpu().clone()
    for g, sg in zip(opt.param_groups, state_dict["param_groups"], strict=True):
        g.update(sg)
