"""Operator settings: environment variables, then flags."""

from __future__ import annotations

from pathlib import Path

import pytest

from troupe_operator.__main__ import parse_args, peering_priority
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


def test_peers_draw_distinct_priorities_unless_one_is_given() -> None:
    drawn = {peering_priority("troupe", None) for _ in range(20)}
    assert len(drawn) > 1
    assert all(priority > 0 for priority in drawn)
    assert peering_priority("troupe", 7) == 7
    assert peering_priority(None, None) == 0


def test_the_operator_binds_to_its_pod_ip_when_it_has_one() -> None:
    assert from_environment({"POD_IP": "127.1.0.9"}).bind_address == "127.1.0.9"
    assert from_environment({}).bind_address == "0.0.0.0"
