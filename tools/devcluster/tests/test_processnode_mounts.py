"""The process node's real mounts and in-cluster API variables: plans, argv and mount points."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from troupe_devcluster.processnode import mountexec, volumes
from troupe_devcluster.processnode.env import api_server_env, base_env
from troupe_devcluster.processnode.mountexec import Mount, MountError
from troupe_devcluster.processnode.sources import ConfigError

POD_DIR = Path("/work/pods/shop_web-1_u-1")
VOLUMES = POD_DIR / "volumes"


def _pod(volume_list: list[dict[str, Any]]) -> Any:
    return {
        "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1"},
        "spec": {"volumes": volume_list, "containers": [{"name": "app"}]},
    }


def _mounts(volume_list: list[dict[str, Any]], mounts: list[dict[str, Any]]) -> list[Mount]:
    return volumes.container_mounts(_pod(volume_list), {"volumeMounts": mounts}, POD_DIR)


def test_a_mount_binds_the_volume_dir_at_its_mount_path() -> None:
    (mount,) = _mounts([{"name": "data", "emptyDir": {}}], [{"name": "data", "mountPath": "/data"}])
    assert mount == Mount("data", str(VOLUMES / "data"), "/data", False, str(VOLUMES / "data"))


def test_a_sub_path_mount_binds_the_path_inside_the_volume() -> None:
    mount = {"name": "cfg", "mountPath": "/etc/app.json", "subPath": "conf/app.json"}
    (planned,) = _mounts([{"name": "cfg", "emptyDir": {}}], [mount])
    assert planned.source == str(VOLUMES / "cfg" / "conf" / "app.json")
    assert planned.root == str(VOLUMES / "cfg")


@pytest.mark.parametrize(
    "volume",
    [
        {"configMap": {"name": "c"}},
        {"secret": {"secretName": "s"}},
        {"downwardAPI": {"items": []}},
        {"projected": {"sources": []}},
    ],
)
def test_volumes_the_node_writes_are_always_read_only(volume: dict[str, Any]) -> None:
    (mount,) = _mounts([{"name": "v", **volume}], [{"name": "v", "mountPath": "/v"}])
    assert mount.read_only


def test_other_volumes_are_read_only_only_when_the_mount_says_so() -> None:
    planned = _mounts(
        [{"name": "a", "emptyDir": {}}, {"name": "b", "hostPath": {"path": "/srv"}}],
        [
            {"name": "a", "mountPath": "/rw"},
            {"name": "b", "mountPath": "/ro", "readOnly": True},
        ],
    )
    assert {mount.target: mount.read_only for mount in planned} == {"/rw": False, "/ro": True}


def test_mounts_come_shallowest_first_so_nested_ones_land_inside() -> None:
    planned = _mounts(
        [{"name": "a", "emptyDir": {}}, {"name": "b", "emptyDir": {}}],
        [{"name": "b", "mountPath": "/etc/app/extra"}, {"name": "a", "mountPath": "/etc/app"}],
    )
    assert [mount.target for mount in planned] == ["/etc/app", "/etc/app/extra"]


def test_a_relative_mount_path_is_taken_from_the_root() -> None:
    (mount,) = _mounts([{"name": "a", "emptyDir": {}}], [{"name": "a", "mountPath": "data/x"}])
    assert mount.target == "/data/x"


@pytest.mark.parametrize(
    ("mounts", "message"),
    [
        ([{"name": "nope", "mountPath": "/x"}], "refers to no volume"),
        ([{"name": "a", "mountPath": "/x/../etc"}], r'without "\.\."'),
        ([{"name": "a", "mountPath": "/x", "subPath": "../up"}], r'without "\.\."'),
        ([{"name": "a", "mountPath": "/x", "subPathExpr": "$(POD)"}], "not supported"),
        ([{"name": "a", "mountPath": "/x"}, {"name": "a", "mountPath": "/x/"}], "mounted twice"),
    ],
)
def test_a_mount_that_cannot_be_planned_is_a_config_error(
    mounts: list[dict[str, Any]], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _mounts([{"name": "a", "emptyDir": {}}], mounts)


def test_api_server_env_names_the_kubeconfig_server() -> None:
    env = api_server_env("https://127.0.0.1:6443")
    assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
    assert env["KUBERNETES_SERVICE_PORT"] == env["KUBERNETES_SERVICE_PORT_HTTPS"] == "6443"
    assert env["KUBERNETES_PORT"] == "tcp://127.0.0.1:6443"
    assert env["KUBERNETES_PORT_6443_TCP_ADDR"] == "127.0.0.1"


def test_api_server_env_defaults_to_the_https_port() -> None:
    assert api_server_env("https://api.local")["KUBERNETES_SERVICE_PORT"] == "443"


def test_base_env_has_the_service_variables_only_given_the_api_server() -> None:
    pod = _pod([])
    plain = base_env(pod, pod_ip="127.1.0.2", node_env={}, tool_dir="/venv/bin")
    assert not any(name.startswith("KUBERNETES_") for name in plain)
    full = base_env(
        pod,
        pod_ip="127.1.0.2",
        node_env={},
        tool_dir="/venv/bin",
        api_server="https://127.0.0.1:40001",
    )
    assert full["KUBERNETES_SERVICE_PORT"] == "40001"
    assert full["POD_IP"] == "127.1.0.2"


def test_run_argv_runs_this_module_isolated_with_the_spec_then_the_container_argv() -> None:
    mount = Mount("v", "/src", "/dst", True, "/src")
    argv = mountexec.run_argv("/venv/bin/python", [mount], ["sleep", "1"], 7)
    assert argv[:4] == ["/venv/bin/python", "-I", "-S", mountexec.this_file()]
    assert argv[5:] == ["sleep", "1"]
    spec = json.loads(argv[4])
    assert spec["status_fd"] == 7
    assert [Mount.from_json(entry) for entry in spec["mounts"]] == [mount]


def test_enter_argv_names_the_container_pid() -> None:
    argv = mountexec.enter_argv("/venv/bin/python", 42, ["cat", "/etc/x"])
    assert json.loads(argv[4]) == {"enter": 42}
    assert argv[5:] == ["cat", "/etc/x"]


def test_a_missing_sub_path_is_created_as_a_directory(tmp_path: Path) -> None:
    mount = Mount("v", str(tmp_path / "a" / "b"), "/x", False, str(tmp_path))
    assert mountexec.resolve_source(mount) == str(tmp_path / "a" / "b")
    assert (tmp_path / "a" / "b").is_dir()


def test_a_sub_path_leading_out_of_its_volume_is_refused(tmp_path: Path) -> None:
    volume = tmp_path / "volume"
    volume.mkdir()
    (volume / "escape").symlink_to(tmp_path)
    mount = Mount("v", str(volume / "escape"), "/x", False, str(volume))
    with pytest.raises(MountError, match="outside the volume"):
        mountexec.resolve_source(mount)


def test_a_directory_source_gets_a_directory_mount_point(tmp_path: Path) -> None:
    mountexec.prepare_target(str(tmp_path), str(tmp_path / "m" / "point"))
    assert (tmp_path / "m" / "point").is_dir()


def test_a_file_source_gets_an_empty_file_mount_point(tmp_path: Path) -> None:
    source = tmp_path / "config.json"
    source.write_text("{}")
    mountexec.prepare_target(str(source), str(tmp_path / "etc" / "config.json"))
    assert (tmp_path / "etc" / "config.json").read_text() == ""


def test_a_file_source_cannot_go_onto_a_directory(tmp_path: Path) -> None:
    source = tmp_path / "config.json"
    source.write_text("{}")
    (tmp_path / "taken").mkdir()
    with pytest.raises(MountError, match="is a directory"):
        mountexec.prepare_target(str(source), str(tmp_path / "taken"))


def test_a_directory_source_cannot_go_onto_a_file(tmp_path: Path) -> None:
    (tmp_path / "taken").write_text("")
    with pytest.raises(MountError, match="not a directory"):
        mountexec.prepare_target(str(tmp_path), str(tmp_path / "taken"))


def test_a_mount_that_would_hide_what_the_container_runs_from_is_recognised() -> None:
    needed = ["/tmp/cluster/pods/p1/volumes/tmp", "/work/.venv"]
    assert mountexec.hides("/tmp", needed) == "/tmp/cluster/pods/p1/volumes/tmp"
    assert mountexec.hides("/tmp/", needed) == "/tmp/cluster/pods/p1/volumes/tmp"
    assert mountexec.hides("/work/.venv", needed) == "/work/.venv"
    assert mountexec.hides("/opt/troupe/code", needed) is None
    assert mountexec.hides("/tmpfoo", needed) is None
