"""Operator settings: environment variables, then flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from troupe_operator.__main__ import configure, identity, parse_args
from troupe_operator.builders.lease import ElectionTimings
from troupe_operator.settings import OperatorSettings, from_environment


def test_defaults_watch_every_namespace() -> None:
    settings = from_environment({})

    assert settings == OperatorSettings()
    assert settings.all_namespaces


def test_environment_variables_are_read() -> None:
    settings = from_environment(
        {
            "TROUPE_NATS_URL": "nats://nats.infra:4222",
            "TROUPE_NATS_CREDENTIALS": "/etc/nats/op.creds",
            "TROUPE_WATCH_NAMESPACES": "team-a, team-b",
            "TROUPE_LOG_FORMAT": "json",
            "TROUPE_RESYNC_SECONDS": "5",
        }
    )

    assert settings.nats_url == "nats://nats.infra:4222"
    assert settings.nats_credentials == Path("/etc/nats/op.creds")
    assert settings.namespaces == ("team-a", "team-b")
    assert (settings.log_format, settings.resync_seconds) == ("json", 5.0)


def test_a_bad_log_format_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="TROUPE_LOG_FORMAT"):
        from_environment({"TROUPE_LOG_FORMAT": "xml"})


def test_flags_win_over_the_environment() -> None:
    from_env = from_environment({"TROUPE_WATCH_NAMESPACES": "team-a"})

    namespaced = parse_args(["--namespace", "team-b", "-n", "team-c"])
    everywhere = parse_args(["--all-namespaces", "--standalone"])

    assert from_env.with_namespaces(namespaced.namespace, False).namespaces == ("team-b", "team-c")
    assert from_env.with_namespaces(None, everywhere.all_namespaces).all_namespaces
    assert everywhere.standalone


def test_help_describes_the_operator(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args(["--help"])

    assert exited.value.code == 0
    assert "--all-namespaces" in capsys.readouterr().out


def test_election_defaults_fail_over_within_seconds() -> None:
    settings = from_environment({"POD_NAMESPACE": "troupe-system", "POD_NAME": "op-7f9c"})

    assert settings.election == ElectionTimings(10, 7.0, 2.0)
    assert (settings.lease_namespace, settings.lease_name) == ("troupe-system", "troupe-operator")
    assert settings.pod_name == "op-7f9c"


def test_election_settings_come_from_the_environment_and_flags_win() -> None:
    environ = {
        "TROUPE_LEASE_NAME": "ops",
        "TROUPE_LEASE_NAMESPACE": "infra",
        "POD_NAMESPACE": "ignored",
        "TROUPE_LEASE_DURATION": "15",
        "TROUPE_RENEW_DEADLINE": "10",
        "TROUPE_RETRY_PERIOD": "3",
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in environ.items():
            patch.setenv(key, value)
        from_env = configure(parse_args([]))
        flagged = configure(parse_args(["--lease-duration", "20", "--lease-name", "other"]))

    assert from_env.election == ElectionTimings(15, 10.0, 3.0)
    assert (from_env.lease_namespace, from_env.lease_name) == ("infra", "ops")
    assert flagged.election == ElectionTimings(20, 10.0, 3.0)
    assert flagged.lease_name == "other"


def test_timings_that_could_make_two_holders_are_refused() -> None:
    with pytest.raises(ValueError, match="renew deadline < lease duration"):
        from_environment({"TROUPE_LEASE_DURATION": "5"})


def test_each_process_gets_its_own_identity_named_after_its_pod() -> None:
    first, second = identity("op-7f9c"), identity("op-7f9c")

    assert first != second
    assert first.startswith("op-7f9c_")
    assert identity("")


def test_the_operator_binds_to_its_pod_ip_when_it_has_one() -> None:
    assert from_environment({"POD_IP": "127.1.0.9"}).bind_address == "127.1.0.9"
    assert from_environment({}).bind_address == "0.0.0.0"
