"""Build logic of the compiled extension ``piece_optim._C`` (csrc/), used by setup.py.

Design decisions:

* The extension is optional.  Without a C++ compiler, without torch at build time, or
  when compiling fails, ``ext_modules_and_cmdclass`` returns / the build step ends
  without it and says why: a CPU-only install never fails because of csrc/.  The
  package then builds it on first use (piece_optim/_ext.py) or falls back to the
  pure-torch reference.  ``PIECE_FORCE_BUILD=1`` turns a failed build into an error (CI).
* The CUDA part (csrc/cuda/*.cu + csrc/cuda_binding.cpp) is added only when CUDA_HOME is
  set (or found) and torch is a CUDA build; ``PIECE_NO_CUDA=1`` skips it.  Architectures
  (:func:`cuda_arch_list`): ``PIECE_CUDA_ARCH_LIST`` if set, else torch's own
  ``TORCH_CUDA_ARCH_LIST`` if set, else "8.0;9.0" (A100, H100/H200), never torch's
  default of "the GPUs visible now" (a build machine may have none).
* Flags: ``-O3 -fno-math-errno`` (lets sqrt vectorise; results unchanged) and
  ``-ffp-contract=off``: the kernels place their fma exactly where torch's own CPU kernels
  have one, so results match the reference bit for bit, and the compiler must not add
  others.  ``-fno-strict-aliasing``: the histogram reads fp32 scores as uint32 bits.
  ``-fopenmp`` for the ATen parallel headers (the kernels run on their own thread pool).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

NAME = "piece_optim._C"
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-strict-aliasing"]
LINK_FLAGS = ["-fopenmp"]
NVCC_FLAGS = ["-O3", "-lineinfo"]  # no fast math: the kernels round explicitly


def _say(msg: str) -> None:
    print(f"piece_optim: {msg}", file=sys.stderr)


def cpu_sources(root: Path) -> list[str]:
    """C++ sources of the CPU build, relative to ``root`` (setuptools wants relative paths)."""
    return ["csrc/ops.cpp", "csrc/cpu/kernels.cpp"]


def cuda_sources(root: Path) -> list[str]:
    return ["csrc/cuda_binding.cpp", *sorted(
        str(p.relative_to(root)) for p in (root / "csrc" / "cuda").glob("*.cu"))]  # fmt: skip


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++").split()[0]
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")


def cuda_arch_list() -> str:
    """The CUDA architectures to build for, e.g. "9.0" (see the module doc for the order).

    ``PIECE_CUDA_ARCH_LIST`` wins over ``TORCH_CUDA_ARCH_LIST``: when both are set and
    differ, it says so rather than silently building for one of them.
    """
    ours = os.environ.get("PIECE_CUDA_ARCH_LIST", "").strip()
    torch_env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if ours:
        if torch_env and torch_env != ours:
            _say(f"PIECE_CUDA_ARCH_LIST={ours!r} overrides TORCH_CUDA_ARCH_LIST={torch_env!r}")
        return ours
    return torch_env or "8.0;9.0"


def cuda_wanted() -> tuple[bool, str]:
    """Whether to build the CUDA part, and if not, why."""
    if os.environ.get("PIECE_NO_CUDA", "0") == "1":
        return False, "PIECE_NO_CUDA=1"
    import torch
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        return False, "torch is a CPU-only build"
    if cpp_extension.CUDA_HOME is None:
        return False, "CUDA_HOME is not set and nvcc was not found"
    return True, ""


def ext_modules_and_cmdclass(root: Path) -> tuple[list, dict]:
    """``(ext_modules, cmdclass)`` for setup(); ``([], {})`` when the extension can't be built."""
    if _compiler() is None:
        _say("no C++ compiler found (set CXX); skipping the C++ extension, the package will "
             "use the pure-torch reference")  # fmt: skip
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot build"
        _say(f"torch is not importable at build time ({exc}); skipping the C++ extension. "
             "Install with pip install --no-build-isolation -e .")  # fmt: skip
        return [], {}

    force = os.environ.get("PIECE_FORCE_BUILD", "0") == "1"

    class OptionalBuildExtension(BuildExtension):
        """Builds the extension; a failure is a warning unless PIECE_FORCE_BUILD=1."""

        def build_extension(self, ext) -> None:  # noqa: ANN001
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                if force:
                    raise
                _say(f"building {ext.name} failed ({type(exc).__name__}: {exc}); the package "
                     "will try again on first use, else use the pure-torch reference")  # fmt: skip

    use_cuda, why = cuda_wanted()
    cxx = list(CXX_FLAGS)
    if use_cuda:
        archs = cuda_arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch's BuildExtension
        _say(f"building the CUDA kernels for compute capability {archs}")
        ext = CUDAExtension(
            NAME,
            cpu_sources(root) + cuda_sources(root),
            include_dirs=[str(root / "csrc")],
            define_macros=[("PIECE_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": NVCC_FLAGS},
            extra_link_args=LINK_FLAGS,
        )
    else:
        _say(f"skipping the CUDA kernels ({why}); building the C++ CPU kernels")
        ext = CppExtension(
            NAME,
            cpu_sources(root),
            include_dirs=[str(root / "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=LINK_FLAGS,
        )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}
