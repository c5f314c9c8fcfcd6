"""Bounds safety of the sparse AdamW step: an index never reaches outside its parameter.

The optimizer validates its indices once (sorted, unique, in range) and keeps private
copies (see :func:`piece_optim.mask.validate_indices`), but its state is still reachable
(``opt.state[p]["idx"]``, the tensors of ``state_dict()``), so a changed index must raise
instead of writing outside the parameter.  Every step path checks, each where it is cheap:

* C++ CPU: the op checks every index of every tensor before any kernel writes
  (``first_out_of_range`` in csrc/cpu, one sequential read of the indices).
* Everything else calls :func:`check_step_indices` first: ``torch.aminmax`` of each index
  tensor, remembered per tensor and its version counter, so a step re-checks only a tensor
  that was created or changed in place since its last check (on a GPU that read is the one
  host sync, once per new index tensor).  An error there leaves everything unchanged.
* Behind that check (a change that bypasses the version counter, e.g. through ``.data``),
  the Triton and CUDA kernels skip any entry whose index is out of range (nothing is read
  or written for it) and set a flag, which :class:`StepStatus` turns into an error: at
  once for CPU tensors, at the next step for CUDA tensors (read without stalling the
  stream).  The pure-torch reference raises from its own index ops.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_checked: WeakIdKeyDictionary = WeakIdKeyDictionary()  # idx -> (version, ptr, k, numel)


def out_of_range_error(idx_value: int, position: int, numel: int, done: str) -> IndexError:
    return IndexError(
        f"piece_optim: sparse AdamW step: index {idx_value} (position {position}) is outside "
        f"its parameter of {numel} entries; {done}. The optimizer's indices were changed after "
        "they were validated (e.g. in place through opt.state[p]['idx'] or a state_dict tensor)"
    )


def check_step_indices(params: Sequence[Tensor], idxs: Sequence[Tensor | None]) -> None:
    """Raise IndexError, before anything is written, if an index is outside its parameter.

    Skipped while torch.compile traces (version counters and data pointers are not
    traceable); the kernels' own checks and the reference's index ops still hold there.
    """
    if torch.compiler.is_compiling():
        return
    for p, idx in zip(params, idxs, strict=True):
        if idx is None or idx.numel() == 0 or idx.device.type == "meta":
            continue
        numel = p.numel()
        key = (idx._version, idx.data_ptr(), idx.numel(), numel)
        if _checked.get(idx) == key:
            continue
        lo, hi = (int(v) for v in torch.aminmax(idx))
        if lo < 0 or hi >= numel:
            bad = lo if lo < 0 else hi
            pos = int((idx == bad).nonzero()[0])
            raise out_of_range_error(bad, pos, numel, "nothing was written")
        _checked[idx] = key


class StepStatus:
    """Per-device int32 flags the Triton/CUDA step kernels set when they skip an index.

    :meth:`flag` gives the (zeroed) flag to pass to the kernels; :meth:`launched` is called
    after them.  CPU tensors (the Triton interpreter) are checked at once.  For CUDA
    tensors the flag is copied to pinned host memory behind the step and checked by the
    next :meth:`flag` call on that device: waiting on that copy's event waits for the
    previous step's kernels only, never for work queued since.
    """

    def __init__(self) -> None:
        self._dev: dict[torch.device, Tensor] = {}
        self._host: dict[torch.device, Tensor] = {}
        self._event: dict[torch.device, object] = {}

    def flag(self, device: torch.device) -> Tensor:
        if device not in self._dev:
            self._dev[device] = torch.zeros(1, dtype=torch.int32, device=device)
            if device.type == "cuda":
                self._host[device] = torch.zeros(1, dtype=torch.int32, pin_memory=True)
        ev = self._event.pop(device, None)
        if ev is not None:
            ev.synchronize()
            if int(self._host[device][0]):
                self._host[device].zero_()
                self._dev[device].zero_()
                raise IndexError(
                    f"piece_optim: the previous sparse AdamW step on {device} met an index "
                    "outside its parameter and skipped that entry (nothing outside the "
                    "parameter was read or written; the other entries were updated). The "
                    "optimizer's indices were changed behind its checks (e.g. through "
                    "opt.state[p]['idx'].data)"
                )
        return self._dev[device]

    def launched(self, device: torch.device) -> None:
        flag = self._dev[device]
        if device.type == "cuda":
            self._host[device].copy_(flag, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record()
            self._event[device] = ev
        elif int(flag[0]):
            flag.zero_()
            raise IndexError(
                "piece_optim: sparse AdamW step: an index outside its parameter was skipped "
                "(nothing outside the parameter was read or written; the other entries were "
                "updated). The optimizer's indices were changed behind its checks (e.g. "
                "through opt.state[p]['idx'].data)"
            )
