"""Gradient hooks that consume ``.grad``: who holds them, and what happens when he is gone.

Two objects install post-accumulate-grad hooks that take the gradient of a parameter as
backward produces it: an ``ImportanceEstimator(in_backward=True)`` (folds it, sets
``param.grad = None``) and a masked ``SparseAdamW(sparse_grads=True)`` (replaces it by a
``SparseGrad`` of the selected entries, or drops it for a param the mask freezes).  A
second consumer of the same parameters gets nothing usable (hooks run in registration
order), so:

* :func:`check_free` refuses to build an estimator or an optimizer over parameters whose
  gradients a live owner already consumes, and names that owner (class, arguments and the
  line that made it) and the fix;
* :func:`consumer_of` lets ``collect()`` say who took the gradients it did not find;
* :func:`register` watches an owner: the hooks hold it weakly (they do nothing once it is
  gone), and when it is garbage-collected with hooks still installed a finalizer removes
  them.  For an estimator it also warns, naming it: its hooks took every gradient while it
  lived, so a forgotten ``close()`` is a bug worth a word.  For a ``sparse_grads``
  optimizer it does not (decision): frameworks own optimizers they never close (HF
  Trainer, deepcopy), its hooks harm nothing once it is gone, and a live forgotten one is
  refused by :func:`check_free` when another consumer is made.
"""

from __future__ import annotations

import os
import sys
import warnings
import weakref
from collections.abc import Collection, Iterable

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

_PKG_DIR = os.path.dirname(os.path.abspath(__file__))
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
# param -> [(weakref to owner, its live handle container, its description)]
_owners: WeakIdKeyDictionary = WeakIdKeyDictionary()


def creation_site() -> str:
    """``file:line`` of the first caller outside piece_optim and torch (where the user made
    the object; torch's Optimizer.__init__ is on the way)."""
    f = sys._getframe(1)
    while f is not None and os.path.abspath(f.f_code.co_filename).startswith(
        (_PKG_DIR, _TORCH_DIR)
    ):
        f = f.f_back
    if f is None:
        return "<unknown>"
    return f"{f.f_code.co_filename}:{f.f_lineno}"


def _live(entry: tuple) -> bool:
    ref, handles, _ = entry
    return ref() is not None and len(handles) > 0


def consumer_of(params: Iterable[Tensor], exclude: object = None) -> str | None:
    """Description of a live owner (other than ``exclude``) whose hooks consume the
    gradients of any of ``params``, or None."""
    for p in params:
        for entry in _owners.get(p, ()):
            if _live(entry) and entry[0]() is not exclude:
                return entry[2]
    return None


def check_free(named: Iterable[tuple[str | None, Tensor]], what: str, owner: object) -> None:
    """Raise if a live owner other than ``owner`` consumes the gradients of one of ``named``."""
    for name, p in named:
        for entry in _owners.get(p, ()):
            if _live(entry) and entry[0]() is not owner:
                shown = repr(name) if name is not None else f"of shape {tuple(p.shape)}"
                raise RuntimeError(
                    f"{what}: parameter {shown} already has gradient hooks of {entry[2]}, "
                    "which take each gradient as backward produces it and free it, so this "
                    "object would never see one. Call close() on that object first (or "
                    "use it in a `with` block), then make this one"
                )


def register(
    owner: object,
    params: Collection[Tensor],
    handles: Collection,
    desc: str,
    watch: bool = True,
    warn: bool = True,
) -> None:
    """Record ``owner`` as the consumer of ``params``' gradients while ``handles`` (its hook
    handles; emptied by its close()) is not empty; ``watch``: also remove the hooks if it is
    garbage-collected with them installed (once per owner), and with ``warn`` say so."""
    ref = weakref.ref(owner)
    for p in params:
        entries = [e for e in _owners.get(p, ()) if _live(e) and e[0]() is not owner]
        entries.append((ref, handles, desc))
        _owners[p] = entries
    if watch:
        fin = weakref.finalize(owner, _collected, handles, desc, warn)
        fin.atexit = False  # at interpreter exit nothing leaks: no warning then


# param -> [(weakref to an ImportanceEstimator, its description)]: collect()-style
# estimators hold no hooks, but each collect() clears the gradients it folds
_readers: WeakIdKeyDictionary = WeakIdKeyDictionary()


def note_reader(owner: object, params: Iterable[Tensor], desc: str) -> None:
    """Record an open estimator that reads (and, at collect(), clears) ``params``' grads."""
    ref = weakref.ref(owner)
    for p in params:
        _readers[p] = [e for e in _readers.get(p, ()) if _open(e[0]())] + [(ref, desc)]


def other_reader(params: Iterable[Tensor], exclude: object) -> str | None:
    """Description of another open estimator over any of ``params``, or None."""
    for p in params:
        for ref, desc in _readers.get(p, ()):
            other = ref()
            if other is not exclude and _open(other):
                return desc
    return None


def _open(obj: object) -> bool:
    return obj is not None and not getattr(obj, "_closed", True)


def _collected(handles: Collection, desc: str, warn: bool) -> None:
    if not handles:
        return  # closed properly
    hooks = list(handles.values()) if isinstance(handles, dict) else list(handles)
    for h in hooks:
        h.remove()
    handles.clear()
    if not warn:
        return
    warnings.warn(
        f"{desc} was garbage-collected with its {len(hooks)} gradient hooks still installed; "
        "they are removed now. Call close() when done (or use it in a `with` block): until "
        "then its hooks take every gradient of those parameters",
        UserWarning,
        stacklevel=2,
    )


def check_not_reentrant_checkpoint() -> None:
    """Raise if a gradient hook runs inside a reentrant checkpoint's backward.

    ``torch.utils.checkpoint(use_reentrant=True)`` recomputes a segment and runs a nested
    backward for it, so a parameter used both inside and outside that segment (tied
    embeddings, a block applied twice) gets two post-accumulate-grad hook calls in one
    ``backward()``: an ``ImportanceEstimator(in_backward=True)`` term would be split in
    two, counting g1^2 + g2^2 instead of (g1 + g2)^2 and starting a spurious new term.  The
    non-reentrant checkpoint has one backward and is exact.  Checked by looking for the
    checkpoint's backward frame (a few frames up the stack, cheap next to the
    accumulation).
    """
    f = sys._getframe(1)
    for _ in range(64):
        if f is None:
            return
        code = f.f_code
        if code.co_name == "backward" and code.co_filename.replace("\\", "/").endswith(
            "torch/utils/checkpoint.py"
        ):
            raise RuntimeError(
                "ImportanceEstimator(in_backward=True) cannot run under reentrant activation "
                "checkpointing (torch.utils.checkpoint(..., use_reentrant=True)): its nested "
                "backward splits a gradient term in two.  Use use_reentrant=False (HF: "
                "model.gradient_checkpointing_enable(gradient_checkpointing_kwargs="
                "{'use_reentrant': False})), or in_backward=False with collect()"
            )
        f = f.f_back
