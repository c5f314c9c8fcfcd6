"""Functional layer: the optimizer class calls these, these call a backend's kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._backends import Backend, get_backend
from ._bounds import check_step_indices
from ._reference import compute_dtype


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _step_value(step: Tensor | int) -> int:
    return int(step.item()) if isinstance(step, Tensor) else int(step)


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
    fp32.

    Two paths:

    * Python-number hyperparameters, eager: the backend's fused kernel, tensors grouped by
      backend (one batched call each); the step counts are read as ints.
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
    groups: dict[int, tuple[Backend, list[int]]] = {}
    by_device: dict[torch.device, Backend] = {}  # resolve once per device, not per tensor
    for i, p in enumerate(params):
        be = by_device.get(p.device)
        if be is None:
            be = by_device[p.device] = get_backend(backend, p.device)
        groups.setdefault(id(be), (be, []))[1].append(i)
    int_steps = [_step_value(s) for s in steps]
    for be, ids in groups.values():
        be.adamw_step_many_(
            [params[i] for i in ids],
            [grads[i] for i in ids],
            [idxs[i] for i in ids],
            [exp_avgs[i] for i in ids],
            [exp_avg_sqs[i] for i in ids],
            [masters[i] for i in ids],
            [int_steps[i] for i in ids],
            lr=float(lr),
            beta1=float(beta1),
            beta2=float(beta2),
            eps=float(eps),
            weight_decay=float(weight_decay),
            grad_is_sparse=grad_is_sparse,
        )


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
    if idx is None:
        g = grad.reshape(-1)
        w = master.view(-1) if master is not None else flat
    else:
        g = grad.reshape(-1) if grad_is_sparse else grad.reshape(-1).index_select(0, idx)
        w = master.view(-1) if master is not None else flat.index_select(0, idx)
    g = g.to(dt)
    if w.dtype != dt:
        w = w.to(dt)
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

    if master is not None and w.data_ptr() != master.data_ptr():
        master.copy_(w.view_as(master))
    if idx is None:
        if w is not flat:
            flat.copy_(w)
    else:
        flat.index_copy_(0, idx.to(torch.int64), w.to(flat.dtype))
