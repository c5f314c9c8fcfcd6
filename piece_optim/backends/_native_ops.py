"""Loading the compiled ops ``torch.ops.piece_optim`` (csrc/) and their fake implementations.

Order of attempts, once per process (:func:`load`):

1. ``import piece_optim._C``: the extension setup.py built.
2. If it is absent (``PIECE_OPTIM_SKIP_BUILD=1``, no compiler at install time, a failed
   build) and the sources are there (a source checkout: ``csrc/`` next to the package),
   build it once with ``torch.utils.cpp_extension.load`` (ninja) into
   ``~/.cache/piece_optim/<torch version>`` (``PIECE_OPTIM_CACHE`` overrides), with one
   log line saying so, flags and sources from :mod:`piece_optim._build_config`.
   ``PIECE_OPTIM_NO_JIT=1`` disables this step.  An installed wheel has no sources: it
   carries the built extension, or none.
3. If that fails too, :func:`load` raises; the registry turns that into "backend
   unavailable" (``auto`` then uses the pure-torch reference, an explicit
   ``backend="cpu"`` fails with advice).  Importing piece_optim never crashes on it.

Fake (meta) implementations are registered here so the ops trace under torch.compile.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import torch

from .. import _build_config, _env

log = logging.getLogger("piece_optim")

_lock = threading.Lock()
_state: dict[str, object] = {}
# a source checkout (editable install): the repository, where csrc/ is
_SOURCE_ROOT = Path(__file__).resolve().parents[2]


def _jit_build() -> str:
    from torch.utils import cpp_extension

    root = _SOURCE_ROOT
    sources = [root / s for s in _build_config.CPU_SOURCES]
    if not all(s.is_file() for s in sources):
        raise ImportError(
            "piece_optim._C is not built and the csrc/ sources are not here (an installed "
            "wheel built without the extension); reinstall from a source checkout with a C++ "
            "compiler: pip install --no-build-isolation -e ."
        )
    cache = (
        Path(_env.get("CACHE") or Path.home() / ".cache" / "piece_optim")
        / f"torch-{torch.__version__}"
    )
    cache.mkdir(parents=True, exist_ok=True)
    log.warning(
        "piece_optim: the compiled extension is missing; building it once into %s (about a minute)",
        cache,
    )
    cpp_extension.load(
        name=_build_config.JIT_NAME,
        sources=[str(s) for s in sources],
        extra_include_paths=[str(root / d) for d in _build_config.INCLUDE_DIRS],
        extra_cflags=list(_build_config.CXX_FLAGS),
        extra_ldflags=list(_build_config.LINK_FLAGS),
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
                if _env.flag("NO_JIT"):
                    raise ImportError(
                        f"piece_optim._C is missing ({exc}); {_env.name('NO_JIT')}=1"
                    ) from exc
                origin = _jit_build()
            _register_fakes()
        except Exception as exc:  # noqa: BLE001 - recorded; the registry says "unavailable"
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

    @reg(lib + "accumulate_many_")
    def _acc_many(grads, sum_gs, sum_g2s, keys):  # noqa: ANN001, ANN202
        return None

    @reg(lib + "score")
    def _score(sum_g, sum_g2, method, eps):  # noqa: ANN001, ANN202
        return sum_g2.new_empty(sum_g2.numel(), dtype=torch.float32)

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
        bc2_sqrts,  # noqa: ANN001, ANN202
        decay,
        lerp_weight,
        beta2,
        sq_weight,
        eps,
        grad_is_sparse,
        status=None,
    ):
        return None
