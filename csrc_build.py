"""Build logic of the compiled extension ``piece_optim._C`` (csrc/), used by setup.py.

The configuration itself (sources, flags, default architectures) is data in
``piece_optim/_build_config.py``, installed with the package (the first-use build reads
it too); this file decides whether and how to build, and is never imported at run time.

Design decisions:

* The extension is optional.  Without a C++ compiler, without torch at build time, or
  when compiling fails, ``ext_modules_and_cmdclass`` returns / the build step ends
  without it and says why: a CPU-only install never fails because of csrc/.  The
  package then builds it on first use (from a source checkout) or falls back to the
  pure-torch reference.  ``PIECE_OPTIM_FORCE_BUILD=1`` turns a failed build into an
  error (CI).
* The CUDA part (csrc/cuda/*.cu + csrc/cuda_binding.cpp) is added only when CUDA_HOME is
  set (or found) and torch is a CUDA build; ``PIECE_OPTIM_NO_CUDA=1`` skips it.
  Architectures (:func:`cuda_arch_list`): ``PIECE_OPTIM_CUDA_ARCH_LIST`` if set, else
  torch's own ``TORCH_CUDA_ARCH_LIST`` if set, else "8.0;9.0" (A100, H100/H200), never
  torch's default of "the GPUs visible now" (a build machine may have none).
* Environment variables: ``PIECE_OPTIM_*``; the old ``PIECE_*`` names still work, with a
  deprecation notice (``piece_optim/_env.py``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import warnings
from pathlib import Path

_PKG = Path(__file__).resolve().parent / "piece_optim"


def _load(name: str):  # noqa: ANN202
    """A stdlib-only module of the package, by path: the package itself (torch, ...) is not
    importable while setup.py runs."""
    spec = importlib.util.spec_from_file_location(f"_piece_optim_{name}", _PKG / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


config = _load("_build_config")
_env = _load("_env")
NAME = config.NAME


def _say(msg: str) -> None:
    print(f"piece_optim: {msg}", file=sys.stderr)


def _get(key: str, default: str = "") -> str:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = _env.get(key, default)
    for w in caught:  # a build log shows no warnings: say it
        _say(str(w.message))
    return value


def cpu_sources(root: Path) -> list[str]:
    """C++ sources of the CPU build, relative to ``root`` (setuptools wants relative paths)."""
    return list(config.CPU_SOURCES)


def cuda_sources(root: Path) -> list[str]:
    return list(config.CUDA_SOURCES)


def _compiler() -> str | None:
    cxx = os.environ.get("CXX", "c++").split()[0]
    return shutil.which(cxx) or shutil.which("g++") or shutil.which("clang++")


def cuda_arch_list() -> str:
    """The CUDA architectures to build for, e.g. "9.0" (see the module doc for the order).

    ``PIECE_OPTIM_CUDA_ARCH_LIST`` wins over ``TORCH_CUDA_ARCH_LIST``: when both are set and
    differ, it says so rather than silently building for one of them.
    """
    ours = _get("CUDA_ARCH_LIST").strip()
    torch_env = os.environ.get("TORCH_CUDA_ARCH_LIST", "").strip()
    if ours:
        if torch_env and torch_env != ours:
            _say(
                f"PIECE_OPTIM_CUDA_ARCH_LIST={ours!r} overrides TORCH_CUDA_ARCH_LIST={torch_env!r}"
            )
        return ours
    return torch_env or config.DEFAULT_CUDA_ARCHS


def cuda_wanted() -> tuple[bool, str]:
    """Whether to build the CUDA part, and if not, why."""
    if _get("NO_CUDA", "0") == "1":
        return False, "PIECE_OPTIM_NO_CUDA=1"
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
        _say(
            "no C++ compiler found (set CXX); skipping the C++ extension, the package will "
            "use the pure-torch reference"
        )
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # noqa: BLE001 - any failure means "cannot build"
        _say(
            f"torch is not importable at build time ({exc}); skipping the C++ extension. "
            "Install with pip install --no-build-isolation -e ."
        )
        return [], {}

    force = _get("FORCE_BUILD", "0") == "1"

    class OptionalBuildExtension(BuildExtension):
        """Builds the extension; a failure is a warning unless PIECE_OPTIM_FORCE_BUILD=1."""

        def build_extension(self, ext) -> None:  # noqa: ANN001
            try:
                super().build_extension(ext)
            except Exception as exc:  # noqa: BLE001
                if force:
                    raise
                _say(
                    f"building {ext.name} failed ({type(exc).__name__}: {exc}); the package "
                    "will try again on first use, else use the pure-torch reference"
                )

    use_cuda, why = cuda_wanted()
    cxx = list(config.CXX_FLAGS)
    include = [str(root / d) for d in config.INCLUDE_DIRS]
    if use_cuda:
        archs = cuda_arch_list()
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs  # read by torch's BuildExtension
        _say(f"building the CUDA kernels for compute capability {archs}")
        ext = CUDAExtension(
            NAME,
            cpu_sources(root) + cuda_sources(root),
            include_dirs=include,
            define_macros=[config.CUDA_DEFINE],
            extra_compile_args={"cxx": cxx, "nvcc": list(config.NVCC_FLAGS)},
            extra_link_args=list(config.LINK_FLAGS),
        )
    else:
        _say(f"skipping the CUDA kernels ({why}); building the C++ CPU kernels")
        ext = CppExtension(
            NAME,
            cpu_sources(root),
            include_dirs=include,
            extra_compile_args={"cxx": cxx},
            extra_link_args=list(config.LINK_FLAGS),
        )
    return [ext], {"build_ext": OptionalBuildExtension.with_options(use_ninja=True)}
