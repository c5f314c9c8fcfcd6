"""The functional layer: the classes call these, these call a backend's kernels.

Every product path goes through here, so the backend rule
(:func:`piece_optim.backends.resolve`) and the shared preparation (AdamW scalars, index
checks, stochastic-rounding keys) happen once, in one place:

* :func:`accumulate_`: fold one gradient term into many pairs of sums;
* :func:`scores`: the PIECE scores of one tensor's sums;
* :func:`select_topk` (and :class:`ScoreSource` + :func:`global_topk` underneath): the exact
  global top-k of the scores of many tensors;
* :func:`sparse_adamw`: one AdamW step over many (sparse) tensors;
* :func:`adamw_scalars`: the scalars of one AdamW step (torch's doubles).

``backend``: ``"auto"`` or a name (see :mod:`piece_optim.backends`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._bounds import check_step_indices
from ._indices import index_dtype_for
from ._select import ScoreSource, _chunked_topk, global_topk
from .backends import Backend, group_by_backend, resolve
from .backends.reference import (
    AdamWScalars,
    adamw_scalars,
    compute_dtype,
    gather_for_step,
    write_back_step,
)

__all__ = [
    "AdamWScalars",
    "ScoreSource",
    "accumulate_",
    "adamw_scalars",
    "adamw_torch_",
    "global_topk",
    "refuse_foreign_adam_flags",
    "score_sources",
    "scores",
    "select_topk",
    "sparse_adamw",
]


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def refuse_foreign_adam_flags(param_groups: Sequence[dict]) -> None:
    """Raise if saved param groups (e.g. a ``torch.optim.AdamW``/``Adam`` state_dict) ask
    for math SparseAdamW does not do: loading would silently drop the flag.

    ``amsgrad`` and ``maximize`` change the update; ``decoupled_weight_decay=False`` with a
    weight decay is torch.optim.Adam's L2 penalty, not AdamW's decay.  Execution flags
    (``foreach``, ``fused``, ``capturable``, ``differentiable``) do not change the math and
    are accepted.
    """
    for i, g in enumerate(param_groups):
        for flag in ("amsgrad", "maximize"):
            if g.get(flag):
                raise ValueError(
                    f"load_state_dict: param group {i} has {flag}=True (a torch.optim.Adam/AdamW "
                    f"state_dict?); SparseAdamW does not support {flag} and would silently drop "
                    f"it. Train with {flag}=False, or keep torch's optimizer for this run"
                )
        if g.get("decoupled_weight_decay") is False and g.get("weight_decay", 0):
            raise ValueError(
                f"load_state_dict: param group {i} has decoupled_weight_decay=False with "
                f"weight_decay={g['weight_decay']} (torch.optim.Adam's L2 penalty); SparseAdamW "
                "decays decoupled, as AdamW does. Load an AdamW state_dict instead"
            )


def sparse_adamw(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    idxs: Sequence[Tensor | None],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    masters: Sequence[Tensor | None],
    steps: Sequence[Tensor | int],
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float,
    weight_decay: float,
    grad_is_sparse: bool = False,
    backend: str = "auto",
) -> None:
    r"""AdamW on the selected entries of each parameter (all entries where idx is None).

    For each tensor, with :math:`g` the gradient gathered at ``idx`` (or the sparse
    gradient values when ``grad_is_sparse``) and :math:`w` the selected weights (the fp32
    ``master`` copy when given), step :math:`t` (``steps``: the step count after this
    step, an int or the optimizer's 0-d step tensor):

    .. math::
        w &\leftarrow w (1 - \gamma\lambda) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        w &\leftarrow w - \frac{\gamma}{1-\beta_1^t}\,
             \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    and ``param.view(-1)[idx] = w``.  Entries outside ``idx`` are untouched.  All math is
    fp32 (float64 for float64 params).

    Two paths:

    * Python-number hyperparameters, eager: the backends' fused kernels.  The scalars are
      made once per distinct step (:func:`adamw_scalars`); tensors are grouped by the
      backend the rule gives their (device, param dtype, grad dtype), one batched call per
      group; every index is checked before any backend writes (a backend that checks its
      own indices before writing runs first; see :mod:`piece_optim._bounds`).
    * Under ``torch.compile``, or with a Tensor ``lr``/beta: :func:`adamw_torch_`, torch
      ops written like ``torch.optim.adamw``'s single-tensor path.  Traceable: step counts
      and a Tensor lr stay tensors (no ``.item()``, so no graph break), and eager it gives
      what torch's AdamW gives with a Tensor lr (its scalars are fp32 tensor ops).
    """
    if _compiling() or any(isinstance(x, Tensor) for x in (lr, beta1, beta2)):
        check_step_indices(params, idxs)  # all before any write (skipped while compiling)
        for p, g, i, m, v, w, s in zip(
            params, grads, idxs, exp_avgs, exp_avg_sqs, masters, steps, strict=True
        ):
            adamw_torch_(
                p,
                g,
                i,
                m,
                v,
                w,
                s,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                grad_is_sparse=grad_is_sparse,
            )
        return
    hp = (float(lr), float(beta1), float(beta2), float(eps), float(weight_decay))
    scalars = []
    last: tuple[int, AdamWScalars] | None = None  # the steps of one call are usually equal
    for s in steps:
        t = int(s.item()) if isinstance(s, Tensor) else int(s)
        if last is None or last[0] != t:
            last = (t, adamw_scalars(*hp, t))
        scalars.append(last[1])
    by_input: dict[tuple, Backend] = {}

    def backend_of(i: int) -> Backend:
        p = params[i]
        key = (p.device, p.dtype, grads[i].dtype)
        be = by_input.get(key)
        if be is None:
            be = by_input[key] = resolve(backend, "adamw", p.device, key[1:])
        return be

    groups = group_by_backend(range(len(params)), backend_of)
    if len(groups) == 1:  # the usual case: no copies of the lists
        be = groups[0][0]
        if not be.checks_indices:
            check_step_indices(params, idxs)
        be.adamw_step_many_(
            params, grads, idxs, exp_avgs, exp_avg_sqs, masters, scalars, grad_is_sparse
        )
        return
    ordered = groups
    unchecked = [i for be, ids in ordered if not be.checks_indices for i in ids]
    check_step_indices([params[i] for i in unchecked], [idxs[i] for i in unchecked])
    # backends that check their own indices first: they raise before anything is written
    ordered.sort(key=lambda group: not group[0].checks_indices)
    for be, ids in ordered:
        be.adamw_step_many_(
            *(
                [seq[i] for i in ids]
                for seq in (params, grads, idxs, exp_avgs, exp_avg_sqs, masters, scalars)
            ),
            grad_is_sparse,
        )


def accumulate_(
    grads: Sequence[Tensor],
    sum_gs: Sequence[Tensor | None],
    sum_g2s: Sequence[Tensor],
    *,
    keys: Sequence[int] | None = None,
    backend: str = "auto",
) -> None:
    """Fold one gradient term into each pair of sums: ``sum_g += g``, ``sum_g2 += g*g``.

    fp32 math; bf16 sums are rounded to nearest even, or stochastically with ``keys`` (one
    per tensor, :func:`piece_optim.backends.reference.stochastic_key`), bit for bit the
    same on every backend.  One batched call per backend.
    """

    def backend_of(i: int) -> Backend:
        g, s1, s2 = grads[i], sum_gs[i], sum_g2s[i]
        return resolve(
            backend, "accumulate", g.device, (g.dtype, s2.dtype, None if s1 is None else s1.dtype)
        )

    for be, ids in group_by_backend(range(len(grads)), backend_of):
        be.accumulate_many_(
            [grads[i] for i in ids],
            [sum_gs[i] for i in ids],
            [sum_g2s[i] for i in ids],
            None if keys is None else [keys[i] for i in ids],
        )


def scores(
    sum_g: Tensor | None, sum_g2: Tensor, method: str, eps: float, *, backend: str = "auto"
) -> Tensor:
    """The flat fp32 PIECE scores of one tensor's sums (``"piece-f"`` or ``"piece-s"``)."""
    be = resolve(backend, "select", sum_g2.device, (sum_g2.dtype,))
    return be.score(sum_g, sum_g2, method, eps)


def score_sources(
    sum_gs: Sequence[Tensor | None],
    sum_g2s: Sequence[Tensor],
    *,
    backend: str = "auto",
    numels: Sequence[int] | None = None,
) -> list[ScoreSource]:
    """:class:`ScoreSource` objects for :func:`global_topk`, each with the backend the rule
    gives its sums; ``numels``: the tensors' sizes the index dtype follows (default: the
    sums' own)."""
    out = []
    for i, (s1, s2) in enumerate(zip(sum_gs, sum_g2s, strict=True)):
        n = s2.numel() if numels is None else numels[i]
        be = resolve(backend, "select", s2.device, (s2.dtype,))
        out.append(ScoreSource(s1, s2, s2.numel(), index_dtype_for(n), be))
    return out


def select_topk(
    sum_gs: Sequence[Tensor | None],
    sum_g2s: Sequence[Tensor],
    k: int,
    method: str,
    eps: float,
    *,
    backend: str = "auto",
) -> list[Tensor]:
    """The exact global top-k of the scores of many tensors' sums: one sorted index tensor
    (int32, int64 for 2**31+ entries) per tensor.  Ties at the threshold go to the lower
    global position (tensor order, then flat index).  A backend that asks for it
    (``select_chunk``) is handed the tensors in pieces; the result is the same."""
    return _chunked_topk(score_sources(sum_gs, sum_g2s, backend=backend), k, method, eps)


def adamw_torch_(
    param: Tensor,
    grad: Tensor,
    idx: Tensor | None,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    master: Tensor | None,
    step: Tensor | int,
    *,
    lr: float | Tensor,
    beta1: float | Tensor,
    beta2: float | Tensor,
    eps: float,
    weight_decay: float,
    grad_is_sparse: bool = False,
) -> None:
    """One AdamW step in torch ops, as ``torch.optim.adam._single_tensor_adam`` (decoupled).

    The same gather/scatter and fp32 conventions as :func:`piece_optim._reference.adamw_step_`;
    the scalar math (bias corrections, step size, decay factor) is torch's: with Tensor
    hyperparameters it is fp32 tensor arithmetic, and under ``torch.compile`` it is the
    formula torch's AdamW is traced with (its ``capturable`` branch: dynamo sets
    ``capturable=True`` in the traced param groups), the step count staying a tensor.
    """
    flat = param.view(-1)
    dt = compute_dtype(param.dtype)  # float64 params in float64, as the reference
    g, w = gather_for_step(flat, grad, idx, master, dt, grad_is_sparse)
    m = exp_avg.view(-1)
    v = exp_avg_sq.view(-1)

    if weight_decay != 0:
        w.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if _compiling():
        # torch.compile traces torch's AdamW with capturable=True (dynamo sets it in the
        # traced param groups), i.e. this formula, with the step count a tensor
        if not isinstance(step, Tensor):
            step = torch.tensor(float(step), device=m.device)
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size_neg = (lr / bias_correction1).neg()
        bias_correction2_sqrt = bias_correction2.sqrt()
        denom = (v.sqrt() / (bias_correction2_sqrt * step_size_neg)).add_(eps / step_size_neg)
        w.addcdiv_(m, denom)
    else:
        if isinstance(step, Tensor):
            step = step.item()  # torch's _get_value outside torch.compile
        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        denom = (v.sqrt() / bias_correction2_sqrt).add_(eps)
        w.addcdiv_(m, denom, value=-step_size)
    write_back_step(flat, w, idx, master)
