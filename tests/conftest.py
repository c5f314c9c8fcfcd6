import pytest
from helpers import fresh_seed


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """Fresh random seed per test; shown in the failure report so a failure reproduces."""
    s = fresh_seed()
    request.node.user_properties.append(("seed", s))
    print(f"seed={s}")
    return s
