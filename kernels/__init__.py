"""Triton kernels of piece_optim, installed as ``piece_optim.kernels``.

One file per op: a private ``_<op>_kernel`` (``@triton.jit``) and an ``<op>_triton()``
launcher.  Importing this package never requires Triton; each op module imports it itself.
``python -m piece_optim.kernels.aot_check`` compiles every kernel for a GPU target without a
GPU (a compile check; see that module).
"""
