"""Triton kernels of piece_optim, installed as ``piece_optim.kernels``.

One file per op: a private ``_<op>_kernel`` (``@triton.jit``) and an ``<op>_triton()``
launcher.  Importing this package never requires Triton; each op module imports it itself.
"""
