"""The gateway's settings: what the environment may say, and a clear refusal for the rest."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from troupe_gateway.settings import Settings, SettingsError


def test_an_empty_environment_gives_the_defaults() -> None:
    assert Settings.from_env({}) == Settings()


def test_a_task_ttl_takes_a_unit() -> None:
    assert Settings.from_env({"TROUPE_GATEWAY_TASK_TTL": "2h"}).task_ttl_seconds == 7200


def test_tls_needs_both_the_certificate_and_the_key() -> None:
    with pytest.raises(SettingsError, match="go together"):
        Settings.from_env({"TROUPE_GATEWAY_TLS_CERT": "/tls/cert.pem"})


@given(
    st.dictionaries(
        st.sampled_from(
            [
                "NATS_URL",
                "TROUPE_GATEWAY_PORT",
                "TROUPE_GATEWAY_PUBLIC_URL",
                "TROUPE_GATEWAY_TASK_TTL",
                "TROUPE_GATEWAY_TLS_CERT",
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
