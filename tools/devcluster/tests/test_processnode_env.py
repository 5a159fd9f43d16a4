"""The process node's env and argv resolution, against the kubelet's rules."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from troupe_devcluster.processnode.env import (
    base_env,
    container_argv,
    container_env,
    expand,
    field_value,
)
from troupe_devcluster.processnode.sources import ConfigError, Sources

POD_IP = "127.1.0.7"
HOST_IP = "127.0.0.1"


def _pod(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {
            "name": "web-1",
            "namespace": "shop",
            "uid": "u-1",
            "labels": {"app": "web", "tier": "front"},
            "annotations": {"note": "hi"},
        },
        "spec": {"nodeName": "process-node", "serviceAccountName": "robot", **spec},
    }


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


SOURCES = Sources(
    config_maps={
        "settings": {"data": {"MODE": "fast", "LEVEL": "3", "bad=key": "x"}},
        "absent": None,
    },
    secrets={"creds": {"data": {"TOKEN": _b64("s3cret")}}, "gone": None},
)


def _env(container: dict[str, Any], sources: Sources = SOURCES) -> dict[str, str]:
    return container_env(
        _pod(), container, sources, base={"POD_IP": POD_IP}, pod_ip=POD_IP, host_ip=HOST_IP
    )


def test_expand_replaces_known_variables() -> None:
    assert expand("--bind $(POD_IP):80", {"POD_IP": "127.1.0.1"}) == "--bind 127.1.0.1:80"


def test_expand_leaves_unknown_variables_as_written() -> None:
    assert expand("$(NOPE)/x", {}) == "$(NOPE)/x"


def test_expand_treats_double_dollar_as_an_escaped_dollar() -> None:
    assert expand("$$(POD_IP) costs $$5", {"POD_IP": "ip"}) == "$(POD_IP) costs $5"


def test_expand_keeps_a_dollar_not_followed_by_a_reference() -> None:
    assert expand("a$b $", {"b": "no"}) == "a$b $"


def test_expand_keeps_an_unclosed_reference() -> None:
    assert expand("x$(POD_IP", {"POD_IP": "ip"}) == "x$(POD_IP"


def test_plain_values_are_set_in_order_and_may_refer_to_earlier_ones() -> None:
    env = _env({"env": [{"name": "A", "value": "1"}, {"name": "B", "value": "$(A)-$(POD_IP)"}]})
    assert env["B"] == f"1-{POD_IP}"


def test_a_value_cannot_refer_to_a_later_variable() -> None:
    env = _env({"env": [{"name": "A", "value": "$(B)"}, {"name": "B", "value": "2"}]})
    assert env["A"] == "$(B)"


def test_env_overrides_env_from() -> None:
    env = _env(
        {
            "envFrom": [{"configMapRef": {"name": "settings"}}],
            "env": [{"name": "MODE", "value": "slow"}],
        }
    )
    assert env["MODE"] == "slow"


def test_env_from_config_map_applies_the_prefix() -> None:
    env = _env({"envFrom": [{"configMapRef": {"name": "settings"}, "prefix": "APP_"}]})
    assert (env["APP_MODE"], env["APP_LEVEL"]) == ("fast", "3")


def test_env_from_skips_keys_that_are_not_valid_names() -> None:
    env = _env({"envFrom": [{"configMapRef": {"name": "settings"}}]})
    assert "bad=key" not in env


def test_env_from_secret_decodes_values() -> None:
    assert _env({"envFrom": [{"secretRef": {"name": "creds"}}]})["TOKEN"] == "s3cret"


def test_env_from_missing_config_map_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match='configmap "shop/absent" not found'):
        _env({"envFrom": [{"configMapRef": {"name": "absent"}}]})


def test_env_from_missing_optional_secret_adds_nothing() -> None:
    env = _env({"envFrom": [{"secretRef": {"name": "gone", "optional": True}}]})
    assert env == {"POD_IP": POD_IP}


def test_config_map_key_ref_reads_the_key() -> None:
    ref = {"configMapKeyRef": {"name": "settings", "key": "LEVEL"}}
    assert _env({"env": [{"name": "L", "valueFrom": ref}]})["L"] == "3"


def test_secret_key_ref_reads_the_decoded_key() -> None:
    ref = {"secretKeyRef": {"name": "creds", "key": "TOKEN"}}
    assert _env({"env": [{"name": "T", "valueFrom": ref}]})["T"] == "s3cret"


def test_missing_key_is_a_config_error() -> None:
    ref = {"configMapKeyRef": {"name": "settings", "key": "NOPE"}}
    with pytest.raises(ConfigError, match="couldn't find key NOPE"):
        _env({"env": [{"name": "X", "valueFrom": ref}]})


def test_missing_secret_is_a_config_error() -> None:
    ref = {"secretKeyRef": {"name": "gone", "key": "K"}}
    with pytest.raises(ConfigError, match='secret "shop/gone" not found'):
        _env({"env": [{"name": "X", "valueFrom": ref}]})


def test_missing_optional_key_leaves_the_variable_unset() -> None:
    ref = {"configMapKeyRef": {"name": "settings", "key": "NOPE", "optional": True}}
    assert "X" not in _env({"env": [{"name": "X", "valueFrom": ref}]})


def test_missing_optional_config_map_leaves_the_variable_unset() -> None:
    ref = {"configMapKeyRef": {"name": "absent", "key": "K", "optional": True}}
    assert "X" not in _env({"env": [{"name": "X", "valueFrom": ref}]})


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("metadata.name", "web-1"),
        ("metadata.namespace", "shop"),
        ("metadata.uid", "u-1"),
        ("spec.nodeName", "process-node"),
        ("spec.serviceAccountName", "robot"),
        ("status.podIP", POD_IP),
        ("status.hostIP", HOST_IP),
        ("metadata.labels['tier']", "front"),
        ("metadata.annotations['missing']", ""),
    ],
)
def test_field_ref_resolves_supported_paths(path: str, expected: str) -> None:
    assert field_value(_pod(), path, pod_ip=POD_IP, host_ip=HOST_IP) == expected


def test_field_ref_of_all_labels_lists_them_sorted() -> None:
    value = field_value(_pod(), "metadata.labels", pod_ip=POD_IP, host_ip=HOST_IP)
    assert value == 'app="web"\ntier="front"'


def test_unsupported_field_ref_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"spec\.hostname"):
        field_value(_pod(), "spec.hostname", pod_ip=POD_IP, host_ip=HOST_IP)


def test_resource_field_ref_is_a_config_error() -> None:
    ref = {"resourceFieldRef": {"resource": "limits.cpu"}}
    with pytest.raises(ConfigError, match="resourceFieldRef"):
        _env({"env": [{"name": "CPU", "valueFrom": ref}]})


def test_argv_is_command_then_args_expanded() -> None:
    container = {"command": ["python", "-m", "http.server"], "args": ["--bind", "$(POD_IP)"]}
    assert container_argv(container, {"POD_IP": POD_IP}) == [
        "python",
        "-m",
        "http.server",
        "--bind",
        POD_IP,
    ]


def test_argv_is_args_alone_without_command() -> None:
    assert container_argv({"args": ["sleep", "5"]}, {}) == ["sleep", "5"]


def test_argv_without_command_or_args_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="neither command nor args"):
        container_argv({"name": "app"}, {})


def test_base_env_puts_the_tool_dir_first_on_path() -> None:
    env = base_env(_pod(), pod_ip=POD_IP, node_env={"PATH": "/usr/bin"}, tool_dir="/venv/bin")
    assert env["PATH"] == "/venv/bin:/usr/bin"


def test_base_env_sets_pod_ip_and_hostname() -> None:
    env = base_env(_pod(), pod_ip=POD_IP, node_env={}, tool_dir="/venv/bin")
    assert (env["POD_IP"], env["HOSTNAME"]) == (POD_IP, "web-1")


def test_base_env_hostname_follows_spec_hostname() -> None:
    env = base_env(_pod(hostname="db-0"), pod_ip=POD_IP, node_env={}, tool_dir="/b")
    assert env["HOSTNAME"] == "db-0"


def test_base_env_keeps_the_node_environment_out() -> None:
    node_env = {"HOME": "/root", "KUBECONFIG": "/secret/kubeconfig"}
    env = base_env(_pod(), pod_ip=POD_IP, node_env=node_env, tool_dir="/b")
    assert env["HOME"] == "/root"
    assert "KUBECONFIG" not in env
