"""Loading the compiled extension ``piece_optim._C`` (csrc/) and its fake implementations.

Order of attempts, once per process (:func:`load`):

1. ``import piece_optim._C``: the extension setup.py built (csrc_build.py).
2. If it is absent (``PIECE_SKIP_BUILD=1``, no compiler at install time, a failed build):
   build it once with ``torch.utils.cpp_extension.load`` (ninja) into
   ``~/.cache/piece_optim/<torch version>`` (``PIECE_OPTIM_CACHE`` overrides), with one log
   line saying so.  ``PIECE_NO_JIT=1`` disables this step.
3. If that fails too, :func:`load` raises; the backend loader turns that into "backend
   unavailable" (``auto`` then quietly uses the pure-torch reference, an explicit
   ``backend="cpu"`` fails with advice).  Importing piece_optim never crashes on it.

Fake (meta) implementations are registered here so the ops trace under torch.compile.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger("piece_optim")

_lock = threading.Lock()
_state: dict[str, object] = {}
_ROOT = Path(__file__).resolve().parent.parent


def _jit_build() -> str:
    from torch.utils import cpp_extension

    src = _ROOT / "csrc"
    if not (src / "ops.cpp").exists():
        raise ImportError("piece_optim._C is not built and the csrc/ sources are not installed")
    import sys

    sys.path.insert(0, str(_ROOT))
    try:
        import csrc_build
    finally:
        sys.path.pop(0)
    cache = (
        Path(os.environ.get("PIECE_OPTIM_CACHE", Path.home() / ".cache" / "piece_optim"))
        / f"torch-{torch.__version__}"
    )
    cache.mkdir(parents=True, exist_ok=True)
    log.warning(
        "piece_optim: the compiled extension is missing; building it once into %s (about a minute)",
        cache,
    )
    cpp_extension.load(
        name="piece_optim_C",
        sources=[str(_ROOT / s) for s in csrc_build.cpu_sources(_ROOT)],
        extra_include_paths=[str(src)],
        extra_cflags=csrc_build.CXX_FLAGS,
        extra_ldflags=csrc_build.LINK_FLAGS,
        build_directory=str(cache),
        is_python_module=False,
        verbose=False,
    )
    return f"jit:{cache}"


def load() -> str:
    """Load the ops (idempotent); returns where they came from.  Raises if unavailable."""
    with _lock:
        if "origin" in _state:
            return str(_state["origin"])
        if "error" in _state:
            raise ImportError(str(_state["error"]))
        try:
            try:
                import piece_optim._C  # noqa: F401  - registers torch.ops.piece_optim

                origin = "built"
            except ImportError as exc:
                if os.environ.get("PIECE_NO_JIT", "0") == "1":
                    raise ImportError(f"piece_optim._C is missing ({exc}); PIECE_NO_JIT=1") from exc
                origin = _jit_build()
            _register_fakes()
        except Exception as exc:  # noqa: BLE001 - recorded; the caller falls back
            _state["error"] = f"{type(exc).__name__}: {exc}"
            raise ImportError(str(_state["error"])) from exc
        _state["origin"] = origin
        return origin


def has_kernel(op: str, dispatch_key: str) -> bool:
    """Whether ``piece_optim::<op>`` has a kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"piece_optim::{op}", dispatch_key)


def _register_fakes() -> None:
    lib = "piece_optim::"
    reg = torch.library.register_fake

    @reg(lib + "accumulate_")
    def _acc(grad, sum_g, sum_g2):  # noqa: ANN001, ANN202
        return None

    @reg(lib + "accumulate_many_")
    def _acc_many(grads, sum_gs, sum_g2s):  # noqa: ANN001, ANN202
        return None

    @reg(lib + "score")
    def _score(sum_g, sum_g2, method, eps):  # noqa: ANN001, ANN202
        return sum_g2.new_empty(sum_g2.numel(), dtype=torch.float32)

    @reg(lib + "histogram_")
    def _hist(scores, hist, shift, prefix):  # noqa: ANN001, ANN202
        return None

    @reg(lib + "score_histogram_")
    def _score_hist(sum_g, sum_g2, method, eps, hist, shift, prefix, cand_cap=0):  # noqa: ANN001, ANN202
        n = torch.library.get_ctx().new_dynamic_size()
        return sum_g2.new_empty(n, dtype=torch.int64)

    @reg(lib + "score_histogram_many_")
    def _score_hist_many(sum_gs, sum_g2s, method, eps, hist, shift, prefix, cand_caps):  # noqa: ANN001, ANN202
        ctx = torch.library.get_ctx()
        return [s.new_empty(ctx.new_dynamic_size(), dtype=torch.int64) for s in sum_g2s][
            : len(cand_caps)
        ]

    @reg(lib + "compact")
    def _compact(sum_g, sum_g2, method, eps, thr, take_eq, index_dtype, candidates=None):  # noqa: ANN001, ANN202
        ctx = torch.library.get_ctx()
        return sum_g2.new_empty(ctx.new_dynamic_size(), dtype=index_dtype), ctx.new_dynamic_size()

    @reg(lib + "adamw_step_many_")
    def _adamw(
        params,
        grads,
        idxs,
        exp_avgs,
        exp_avg_sqs,
        masters,
        step_sizes,
        bc2_sqrts,
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        grad_is_sparse,
        status=None,
    ):  # noqa: ANN001, ANN202
        return None
