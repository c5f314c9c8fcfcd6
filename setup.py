"""Build script for piece_optim.

The pure-Python package always installs.  The compiled extension ``piece_optim._C``
(csrc/) is optional: it is added by the csrc build logic below when a C++ compiler
and torch are importable at build time, and never makes a CPU-only install fail.
Install with ``pip install --no-build-isolation -e .`` so the build sees the
torch you already have (an isolated build would download a CUDA torch).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent.resolve()
sys.path.insert(0, str(ROOT))  # so csrc_build.py is importable under any build frontend

# Packages whose source folder is not their import path, declared once: the repository's
# kernels/ is installed as piece_optim.kernels (never as a top-level `kernels`).
# tests/test_packaging.py checks both an editable install and a built wheel against it.
PACKAGE_DIRS = {"piece_optim.kernels": "kernels"}


def _version() -> str:
    text = (ROOT / "piece_optim" / "_version.py").read_text()
    return re.search(r'__version__ = "([^"]+)"', text).group(1)


def _ext_modules_and_cmdclass() -> tuple[list, dict]:
    """Compiled parts; an empty list when they cannot or should not be built."""
    try:
        import csrc_build  # csrc/ build logic; configuration in piece_optim/_build_config.py
    except ImportError:
        return [], {}
    if csrc_build._get("SKIP_BUILD", "0") == "1":
        print("piece_optim: PIECE_OPTIM_SKIP_BUILD=1, skipping the C++/CUDA extension")
        return [], {}
    return csrc_build.ext_modules_and_cmdclass(ROOT)


ext_modules, cmdclass = _ext_modules_and_cmdclass()

setup(
    name="piece-optim",
    version=_version(),
    description="PIECE: importance-selected sparse fine-tuning as a drop-in AdamW replacement",
    long_description=(ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[*find_packages(include=["piece_optim", "piece_optim.*"]), *PACKAGE_DIRS],
    package_dir={"piece_optim": "piece_optim", **PACKAGE_DIRS},
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
