import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors.  This must
# be set before anything imports triton (its @triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from helpers import fresh_seed  # noqa: E402


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """Fresh random seed per test; shown in the failure report so a failure reproduces."""
    s = fresh_seed()
    request.node.user_properties.append(("seed", s))
    print(f"seed={s}")
    return s
