"""One Prefect test server for every flow test: restarting it between modules leaves Prefect's
log worker pointing at a stopped server, whose failing log calls then recurse through log_prints."""

import pytest
from prefect.testing.utilities import prefect_test_harness


@pytest.fixture(scope="session")
def harness():
    with prefect_test_harness(server_startup_timeout=120):
        yield
