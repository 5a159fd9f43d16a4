"""The process node's volume layout and contents."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest

from troupe_devcluster.processnode import volumes
from troupe_devcluster.processnode.sources import ConfigError, Sources, referenced_names
from troupe_devcluster.processnode.volumes import EmptyDir, File, Files, HostPath

POD_IP = "127.1.0.9"
POD_DIR = Path("/work/pods/shop_web-1_u-1")

SOURCES = Sources(
    config_maps={
        "settings": {"data": {"app.yaml": "a: 1\n"}, "binaryData": {"logo": "AAE="}},
        "absent": None,
    },
    secrets={"creds": {"data": {"token": base64.b64encode(b"t0k").decode()}}, "gone": None},
)


def _pod(volume_list: list[dict[str, Any]], mounts: list[dict[str, Any]] | None = None) -> Any:
    return {
        "metadata": {"name": "web-1", "namespace": "shop", "uid": "u-1", "labels": {"a": "b"}},
        "spec": {
            "volumes": volume_list,
            "containers": [{"name": "app", "volumeMounts": mounts or []}],
        },
    }


def _no_token(audience: str | None, seconds: int) -> str:
    raise AssertionError("no token expected")


def _plan(volume: dict[str, Any], token: volumes.TokenSource = _no_token) -> volumes.VolumePlan:
    volume = {"name": "v", **volume}
    return volumes.plan_volume(
        volume, _pod([volume]), SOURCES, token, pod_ip=POD_IP, host_ip="127.0.0.1"
    )


def test_pod_dir_is_named_after_namespace_name_and_uid(tmp_path: Path) -> None:
    assert volumes.pod_dir(tmp_path, _pod([])) == tmp_path / "pods" / "shop_web-1_u-1"


def test_volume_env_name_is_upper_case_with_underscores() -> None:
    assert volumes.volume_env_name("kube-api.access") == "TROUPE_VOLUME_KUBE_API_ACCESS"


def test_volume_env_names_every_volume_and_the_mount_root() -> None:
    env = volumes.volume_env(_pod([{"name": "cfg", "emptyDir": {}}]), POD_DIR)
    assert env == {
        "TROUPE_MOUNT_ROOT": str(POD_DIR / "root"),
        "TROUPE_VOLUME_CFG": str(POD_DIR / "volumes" / "cfg"),
    }


def test_mount_links_point_mount_paths_under_root_at_volume_dirs() -> None:
    pod = _pod([{"name": "cfg", "emptyDir": {}}], [{"name": "cfg", "mountPath": "/etc/app"}])
    links = volumes.mount_links(pod, POD_DIR)
    assert links == {POD_DIR / "root" / "etc" / "app": POD_DIR / "volumes" / "cfg"}


def test_mount_links_honour_sub_path() -> None:
    mount = {"name": "cfg", "mountPath": "/etc/app.yaml", "subPath": "app.yaml"}
    links = volumes.mount_links(_pod([{"name": "cfg", "emptyDir": {}}], [mount]), POD_DIR)
    assert links[POD_DIR / "root" / "etc" / "app.yaml"] == POD_DIR / "volumes" / "cfg" / "app.yaml"


def test_mount_of_an_unknown_volume_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="refers to no volume"):
        volumes.mount_links(_pod([], [{"name": "cfg", "mountPath": "/x"}]), POD_DIR)


def test_mount_path_escaping_the_root_is_a_config_error() -> None:
    pod = _pod([{"name": "cfg", "emptyDir": {}}], [{"name": "cfg", "mountPath": "/../etc"}])
    with pytest.raises(ConfigError, match=r'without "\.\."'):
        volumes.mount_links(pod, POD_DIR)


def test_two_volumes_on_one_mount_path_are_a_config_error() -> None:
    pod = _pod(
        [{"name": "a", "emptyDir": {}}, {"name": "b", "emptyDir": {}}],
        [{"name": "a", "mountPath": "/data"}, {"name": "b", "mountPath": "/data"}],
    )
    with pytest.raises(ConfigError, match="two different volumes"):
        volumes.mount_links(pod, POD_DIR)


def test_config_map_volume_holds_data_and_binary_data() -> None:
    assert _plan({"configMap": {"name": "settings"}}) == Files(
        {"app.yaml": File(b"a: 1\n"), "logo": File(b"\x00\x01")}
    )


def test_config_map_volume_items_choose_keys_paths_and_modes() -> None:
    items = [{"key": "app.yaml", "path": "conf/app.yaml", "mode": 0o600}]
    plan = _plan({"configMap": {"name": "settings", "items": items}})
    assert plan == Files({"conf/app.yaml": File(b"a: 1\n", 0o600)})


def test_config_map_volume_item_with_missing_key_is_a_config_error() -> None:
    items = [{"key": "nope", "path": "nope"}]
    with pytest.raises(ConfigError, match='has no key "nope"'):
        _plan({"configMap": {"name": "settings", "items": items}})


def test_missing_config_map_volume_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match='configmap "absent" not found'):
        _plan({"configMap": {"name": "absent"}})


def test_missing_optional_secret_volume_is_empty() -> None:
    assert _plan({"secret": {"secretName": "gone", "optional": True}}) == Files({})


def test_secret_volume_holds_decoded_data_with_default_mode() -> None:
    plan = _plan({"secret": {"secretName": "creds", "defaultMode": 0o400}})
    assert plan == Files({"token": File(b"t0k", 0o400)})


def test_downward_api_volume_writes_field_values() -> None:
    items = [{"path": "name", "fieldRef": {"fieldPath": "metadata.name"}}]
    assert _plan({"downwardAPI": {"items": items}}) == Files({"name": File(b"web-1")})


def test_projected_volume_combines_its_sources() -> None:
    requested: list[tuple[str | None, int]] = []

    def token(audience: str | None, seconds: int) -> str:
        requested.append((audience, seconds))
        return "jwt"

    sources = [
        {"serviceAccountToken": {"path": "token", "expirationSeconds": 3607}},
        {"configMap": {"name": "settings", "items": [{"key": "app.yaml", "path": "ca.crt"}]}},
        {
            "downwardAPI": {
                "items": [{"path": "ns", "fieldRef": {"fieldPath": "metadata.namespace"}}]
            }
        },
    ]
    plan = _plan({"projected": {"sources": sources, "defaultMode": 0o444}}, token)
    assert plan == Files(
        {"token": File(b"jwt", 0o444), "ca.crt": File(b"a: 1\n", 0o444), "ns": File(b"shop", 0o444)}
    )
    assert requested == [(None, 3607)]


def test_empty_dir_volume_is_planned_as_empty_dir() -> None:
    assert _plan({"emptyDir": {}}) == EmptyDir()


def test_host_path_volume_is_planned_as_a_link_to_the_host_path() -> None:
    plan = _plan({"hostPath": {"path": "/var/data", "type": "DirectoryOrCreate"}})
    assert plan == HostPath("/var/data", create=True)


def test_unsupported_volume_type_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="persistentVolumeClaim"):
        _plan({"persistentVolumeClaim": {"claimName": "data"}})


def test_referenced_names_cover_env_and_volumes() -> None:
    pod = _pod(
        [
            {"name": "a", "configMap": {"name": "cm-vol"}},
            {"name": "b", "secret": {"secretName": "s-vol"}},
            {"name": "c", "projected": {"sources": [{"configMap": {"name": "cm-proj"}}]}},
        ]
    )
    pod["spec"]["containers"][0]["envFrom"] = [{"secretRef": {"name": "s-env"}}]
    pod["spec"]["containers"][0]["env"] = [
        {"name": "X", "valueFrom": {"configMapKeyRef": {"name": "cm-env", "key": "k"}}}
    ]
    assert referenced_names(pod) == ({"cm-vol", "cm-proj", "cm-env"}, {"s-vol", "s-env"})


def test_write_volume_writes_files_with_their_modes(tmp_path: Path) -> None:
    volumes.write_volume(tmp_path / "v", Files({"conf/a.txt": File(b"x", 0o600)}))
    written = tmp_path / "v" / "conf" / "a.txt"
    assert (written.read_bytes(), written.stat().st_mode & 0o777) == (b"x", 0o600)


def test_write_volume_removes_files_no_longer_planned(tmp_path: Path) -> None:
    volumes.write_volume(tmp_path / "v", Files({"old/a": File(b"1"), "b": File(b"2")}))
    volumes.write_volume(tmp_path / "v", Files({"b": File(b"3")}))
    assert sorted(p.name for p in (tmp_path / "v").rglob("*")) == ["b"]


def test_write_mount_links_makes_symlinks_to_targets(tmp_path: Path) -> None:
    target = tmp_path / "volumes" / "cfg"
    target.mkdir(parents=True)
    link = tmp_path / "root" / "etc" / "app"
    volumes.write_mount_links({link: target})
    assert link.resolve() == target
