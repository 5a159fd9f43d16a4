"""The gateway's settings: what the environment may say, and a clear refusal for the rest."""

from __future__ import annotations

import pytest
from a2a.utils.push_url_validator import validate_push_notification_url
from hypothesis import given
from hypothesis import strategies as st
from troupe_gateway import a2a_server
from troupe_gateway.services import Services
from troupe_gateway.settings import Settings, SettingsError


def test_an_empty_environment_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_a_task_ttl_takes_a_unit() -> None:
    assert Settings.from_env({"TROUPE_GATEWAY_TASK_TTL": "2h"}).task_ttl_seconds == 7200


def test_tls_needs_both_the_certificate_and_the_key() -> None:
    with pytest.raises(SettingsError, match="go together"):
        Settings.from_env({"TROUPE_GATEWAY_TLS_CERT": "/tls/cert.pem"})


def test_push_urls_stay_off_private_networks_unless_allowed() -> None:
    assert not Settings().push_private_networks
    for value, allowed in (("true", True), ("1", True), ("False", False), ("no", False)):
        env = {"TROUPE_GATEWAY_PUSH_PRIVATE_NETWORKS": value}
        assert Settings.from_env(env).push_private_networks is allowed
    with pytest.raises(SettingsError, match="TROUPE_GATEWAY_PUSH_PRIVATE_NETWORKS"):
        Settings.from_env({"TROUPE_GATEWAY_PUSH_PRIVATE_NETWORKS": "maybe"})


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "NATS_URL",
                "TROUPE_GATEWAY_PORT",
                "TROUPE_GATEWAY_PUBLIC_URL",
                "TROUPE_GATEWAY_TASK_TTL",
                "TROUPE_GATEWAY_TLS_CERT",
                "TROUPE_GATEWAY_PUSH_PRIVATE_NETWORKS",
            ]
        ),
        st.text(max_size=40),
    )
)
def test_any_environment_is_settings_or_a_settings_error(env: dict[str, str]) -> None:
    try:
        settings = Settings.from_env(env)
    except SettingsError:
        return
    assert 0 < settings.port <= 65535
    assert 0 < settings.task_ttl_seconds <= 365 * 24 * 3600


@pytest.mark.parametrize("allowed", [False, True])
def test_the_a2a_front_end_checks_push_urls_unless_private_networks_are_allowed(
    allowed: bool,
) -> None:
    services = Services(
        nc=None,  # type: ignore[arg-type]  # building the front end touches no connection
        js=None,  # type: ignore[arg-type]
        calls=None,  # type: ignore[arg-type]
        directory=None,  # type: ignore[arg-type]
        authorizer=None,  # type: ignore[arg-type]
        kube=None,  # type: ignore[arg-type]
        settings=Settings(push_private_networks=allowed),
    )
    validator = a2a_server.front_end(services).handler.push_url_validator
    assert (validator is None) is allowed
    if not allowed:
        assert validator is validate_push_notification_url
