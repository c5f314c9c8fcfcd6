"""Test configuration: the test device, the cpu_only marker and the seed fixture.

``PIECE_OPTIM_TEST_DEVICE`` (``cpu`` by default, or ``cuda``) is the device the
device-aware tests build their models and tensors on (``helpers.DEVICE``).  With ``cpu``
the suite is exactly the CPU suite (Triton runs in its interpreter).  With ``cuda`` the
tests marked ``cpu_only`` (demo, distributed gloo, packaging, benchmark CSV, the C++ CPU
kernels, the HF Trainer integration) are deselected, so a GPU stage
(``PIECE_OPTIM_TEST_DEVICE=cuda PIECE_OPTIM_BACKEND=cuda|triton``) runs exactly the tests
that exercise the GPU paths; pytest's summary line counts the deselected ones.

Tests that take the ``seed`` fixture draw a fresh seed every run and print it with a
failure; ``--seed S`` reruns them with seed S, ``--seeds N`` runs each with N fresh seeds
(how seed-dependent assertions are hunted down before CI meets them).
"""

import os

import pytest
import torch
from helpers import DEVICE, fresh_seed  # imports torch only, not triton

# On the CPU the Triton kernels run in Triton's interpreter on CPU tensors.  This must be
# set before anything imports triton (its @triton.jit reads it at decoration time).
if DEVICE.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("piece_optim", "piece_optim test seeds")
    group.addoption(
        "--seed",
        type=int,
        default=None,
        help="run every test that takes the `seed` fixture with this seed (reproduce a "
        "failure: the report prints the seed)",
    )
    group.addoption(
        "--seeds",
        type=int,
        default=1,
        help="run every test that takes the `seed` fixture with N fresh seeds (a sweep for "
        "seed-dependent failures; default 1)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """--seed / --seeds: the seeded tests parametrized by seed (the id names it)."""
    if "seed" not in metafunc.fixturenames:
        return
    opt = metafunc.config.option
    if opt.seed is not None:
        seeds = [opt.seed]
    elif opt.seeds > 1:
        seeds = [fresh_seed() for _ in range(opt.seeds)]
    else:
        return
    metafunc.parametrize("seed", seeds, ids=lambda s: f"seed{s}")


def pytest_configure(config: pytest.Config) -> None:
    if config.option.seeds < 1:
        raise pytest.UsageError(f"--seeds {config.option.seeds}: give 1 or more fresh seeds")
    if config.option.seed is not None and config.option.seeds != 1:
        raise pytest.UsageError("--seed fixes the seed, --seeds draws N: give one of them")
    if config.option.seed is not None and not 0 <= config.option.seed < 2**31:
        raise pytest.UsageError(f"--seed {config.option.seed}: a seed is in [0, 2**31)")
    config.addinivalue_line(
        "markers",
        "cpu_only(reason): CPU by nature (gloo, packaging, CSV, the C++ CPU kernels...); "
        "deselected when PIECE_OPTIM_TEST_DEVICE=cuda",
    )
    # --collect-only may list the GPU selection on any machine (gpu_check.sh --dry-run)
    if DEVICE.type == "cuda" and not config.option.collectonly:
        if not torch.cuda.is_available():
            raise pytest.UsageError(
                "PIECE_OPTIM_TEST_DEVICE=cuda but torch sees no GPU (torch "
                f"{torch.__version__}, CUDA {torch.version.cuda}); unset it to test on CPU"
            )
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise pytest.UsageError(
                "PIECE_OPTIM_TEST_DEVICE=cuda with TRITON_INTERPRET=1: the GPU stage must run "
                "the compiled Triton kernels; unset TRITON_INTERPRET"
            )


def pytest_report_header(config: pytest.Config) -> str:
    return (
        f"piece_optim test device: {DEVICE} (PIECE_OPTIM_TEST_DEVICE), backend: "
        f"{os.environ.get('PIECE_OPTIM_BACKEND') or 'auto'} (PIECE_OPTIM_BACKEND)"
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if DEVICE.type != "cuda":
        return
    keep, drop = [], []
    for item in items:
        (drop if item.get_closest_marker("cpu_only") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """Fresh random seed per test; shown in the failure report so a failure reproduces."""
    s = fresh_seed()
    request.node.user_properties.append(("seed", s))
    print(f"seed={s}")
    return s
