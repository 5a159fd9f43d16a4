"""The operator the integration modules share: one per module, so each module's objects
are finalized before its operator stops. A module that needs settings of its own overrides
``operator_env``."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.operator_support import OperatorProcess, running_operator
from troupe_devcluster.fixtures import ClusterEndpoints


@pytest.fixture(scope="module")
def operator_env() -> dict[str, str]:
    """Added to the environment of the module's operator."""
    return {}


@pytest.fixture(scope="module")
def operator(
    cluster: ClusterEndpoints,
    tmp_path_factory: pytest.TempPathFactory,
    operator_env: dict[str, str],
) -> Iterator[OperatorProcess]:
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    with running_operator(cluster, log, operator_env) as process:
        yield process
