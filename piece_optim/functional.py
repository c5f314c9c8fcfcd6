"""Functional layer: the optimizer class calls these, these call a backend's kernels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ._backends import Backend, get_backend


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
    steps: Sequence[int],
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_is_sparse: bool = False,
    backend: str = "auto",
) -> None:
    r"""AdamW on the selected entries of each parameter (all entries where idx is None).

    For each tensor, with :math:`g` the gradient gathered at ``idx`` (or the sparse
    gradient values when ``grad_is_sparse``) and :math:`w` the selected weights (the fp32
    ``master`` copy when given), step :math:`t`:

    .. math::
        w &\leftarrow w (1 - \gamma\lambda) \\
        m &\leftarrow \beta_1 m + (1-\beta_1) g \\
        v &\leftarrow \beta_2 v + (1-\beta_2) g^2 \\
        w &\leftarrow w - \frac{\gamma}{1-\beta_1^t}\,
             \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    and ``param.view(-1)[idx] = w``.  Entries outside ``idx`` are untouched.  All math is
    fp32.  Tensors are grouped by backend (one batched call each).
    """
    groups: dict[int, tuple[Backend, list[int]]] = {}
    by_device: dict[torch.device, Backend] = {}  # resolve once per device, not per tensor
    for i, p in enumerate(params):
        be = by_device.get(p.device)
        if be is None:
            be = by_device[p.device] = get_backend(backend, p.device)
        groups.setdefault(id(be), (be, []))[1].append(i)
    for be, ids in groups.values():
        be.adamw_step_many_(
            [params[i] for i in ids],
            [grads[i] for i in ids],
            [idxs[i] for i in ids],
            [exp_avgs[i] for i in ids],
            [exp_avg_sqs[i] for i in ids],
            [masters[i] for i in ids],
            [steps[i] for i in ids],
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            grad_is_sparse=grad_is_sparse,
        )
