"""Build configuration of the compiled extension ``piece_optim._C`` (``csrc/``): data only.

``csrc_build.py`` (setup.py's build logic) reads it at build time, and
:mod:`piece_optim.backends._native_ops` when it builds the extension on first use; it is
installed with the package, so nothing at run time reads a repository-root file for it.
No imports: ``setup.py`` loads this file by path before the package exists.

Flags, and why: ``-O3 -fno-math-errno`` (lets sqrt vectorise; results unchanged);
``-ffp-contract=off``: the kernels place their fma exactly where torch's own CPU kernels
have one, so results match the reference bit for bit, and the compiler must not add
others; ``-fno-strict-aliasing``: the histogram reads fp32 scores as uint32 bits;
``-fopenmp`` for the ATen parallel headers (the kernels run on their own thread pool).
nvcc: no fast math (the kernels round explicitly).
"""

NAME = "piece_optim._C"  # the module setup.py builds
JIT_NAME = "piece_optim_C"  # the library built on first use when NAME is missing
CPU_SOURCES = ("csrc/ops.cpp", "csrc/cpu/kernels.cpp")
CUDA_SOURCES = (
    "csrc/cuda_binding.cpp",
    "csrc/cuda/accumulate.cu",
    "csrc/cuda/adamw.cu",
    "csrc/cuda/select.cu",
)
INCLUDE_DIRS = ("csrc",)
CXX_FLAGS = ("-O3", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-fno-strict-aliasing")
LINK_FLAGS = ("-fopenmp",)
NVCC_FLAGS = ("-O3", "-lineinfo")
CUDA_DEFINE = ("PIECE_WITH_CUDA", "1")
# A100 and H100/H200: never torch's default of "the GPUs visible now" (a build machine
# may have none)
DEFAULT_CUDA_ARCHS = "8.0;9.0"
