"""Build script for piece_optim.

The pure-Python package always installs.  The compiled extension ``piece_optim._C``
(csrc/) is optional: it is added by the csrc build logic below when a C++ compiler
and torch are importable at build time, and never makes a CPU-only install fail.
Install with ``pip install --no-build-isolation -e .`` so the build sees the
torch you already have (an isolated build would download a CUDA torch).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
sys.path.insert(0, str(ROOT))  # so csrc_build.py is importable under any build frontend


def _version() -> str:
    text = (ROOT / "piece_optim" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def _ext_modules_and_cmdclass() -> tuple[list, dict]:
    """Compiled parts; an empty list when they cannot or should not be built."""
    if os.environ.get("PIECE_SKIP_BUILD", "0") == "1":
        print("piece_optim: PIECE_SKIP_BUILD=1, skipping the C++/CUDA extension")
        return [], {}
    try:
        from csrc_build import ext_modules_and_cmdclass  # csrc/ build logic, csrc_build.py
    except ImportError:
        return [], {}
    return ext_modules_and_cmdclass(ROOT)


ext_modules, cmdclass = _ext_modules_and_cmdclass()

setup(
    name="piece-optim",
    version=_version(),
    description="PIECE: importance-selected sparse fine-tuning as a drop-in AdamW replacement",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        *find_packages(include=["piece_optim", "piece_optim.*"]),
        "piece_optim.kernels",
    ],
    package_dir={"piece_optim": "piece_optim", "piece_optim.kernels": "kernels"},
    include_package_data=True,
    package_data={"piece_optim.demo": ["weights/*.safetensors"]},
    install_requires=[
        "torch>=2.6",
        "numpy",
        "safetensors",
        "tqdm",
        "transformers>=4.40",
    ],
    extras_require={
        "triton": ["triton"],
        "demo": ["peft", "matplotlib"],
        "plot": ["matplotlib"],
        "dist": ["accelerate"],
        "dev": [
            "pytest",
            "hypothesis",
            "ninja",
            "ruff",
            "triton",
            "peft",
            "accelerate",
            "matplotlib",
            "lightning",
        ],
    },
    entry_points={"console_scripts": ["piece-optim=piece_optim.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
