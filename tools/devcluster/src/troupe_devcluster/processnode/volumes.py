"""Pod volumes as directories, mounted at their real paths or followed through symlinks.

The node lays each pod out as

    <workdir>/pods/<namespace>_<name>_<uid>/          the pod dir, every container's cwd
        volumes/<volume>/                             one directory per volume
        root/<mountPath>  ->  volumes/<volume>[/<subPath>]
        <container>.log                               stdout+stderr of that container

Where the node may make mount namespaces (it runs as root), each container
also sees its volumeMounts at their real ``mountPath``: ``container_mounts``
says what to bind where and ``mountexec`` does it in the container's own
mount namespace. configMap, secret, downwardAPI and projected volumes are
always mounted read-only, as the kubelet does; others when ``readOnly``.

Either way containers are told where things are with ``TROUPE_VOLUME_<NAME>``
(the volume dir; the name upper-cased, anything not alphanumeric turned into
``_``) and ``TROUPE_MOUNT_ROOT`` (the ``root`` dir: a container finds its
``mountPath`` under it). The layout and contents are pure; ``write_*`` do I/O.

Supported: configMap, secret, downwardAPI, projected (configMap, secret,
downwardAPI, serviceAccountToken), emptyDir and hostPath (a symlink to the
host path). Anything else is a ConfigError.
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from troupe_devcluster.processnode.env import field_value
from troupe_devcluster.processnode.mountexec import Mount
from troupe_devcluster.processnode.sources import JSON, ConfigError, Sources, all_containers

DEFAULT_MODE = 0o644
DEFAULT_TOKEN_EXPIRATION_SECONDS = 3600

# Volume types whose contents the node writes: the container may only read them.
API_DATA_VOLUMES = ("configMap", "secret", "downwardAPI", "projected")

TokenSource = Callable[[str | None, int], str]
"""Returns a service-account token for (audience or None for the API server's, seconds)."""


@dataclass(frozen=True)
class File:
    data: bytes
    mode: int = DEFAULT_MODE


@dataclass(frozen=True)
class Files:
    """A volume whose whole content the node writes (configMap, secret, ...)."""

    files: Mapping[str, File]


@dataclass(frozen=True)
class EmptyDir:
    """A scratch directory that lives as long as the pod dir."""


@dataclass(frozen=True)
class HostPath:
    """A volume that is the host's own directory."""

    path: str
    create: bool


VolumePlan = Files | EmptyDir | HostPath


def pod_dir(workdir: Path, pod: JSON) -> Path:
    metadata = pod["metadata"]
    return workdir / "pods" / f"{metadata['namespace']}_{metadata['name']}_{metadata['uid']}"


def volume_dir(pod_directory: Path, volume_name: str) -> Path:
    return pod_directory / "volumes" / volume_name


def mount_root(pod_directory: Path) -> Path:
    return pod_directory / "root"


def volume_env_name(volume_name: str) -> str:
    return "TROUPE_VOLUME_" + re.sub(r"[^A-Z0-9]", "_", volume_name.upper())


def volume_env(pod: JSON, pod_directory: Path) -> dict[str, str]:
    """``TROUPE_MOUNT_ROOT`` and one ``TROUPE_VOLUME_<NAME>`` per volume of the pod."""
    env = {"TROUPE_MOUNT_ROOT": str(mount_root(pod_directory))}
    for volume in (pod.get("spec") or {}).get("volumes") or []:
        env[volume_env_name(volume["name"])] = str(volume_dir(pod_directory, volume["name"]))
    return env


def _relative(path: str, what: str) -> PurePosixPath:
    relative = PurePosixPath(path.lstrip("/"))
    if not relative.parts or ".." in relative.parts:
        raise ConfigError(f'{what} "{path}" must name a path without ".."')
    return relative


def mount_links(pod: JSON, pod_directory: Path) -> dict[Path, Path]:
    """Symlink path -> target for every volumeMount of every container.

    All containers of a pod share one mount root, so two mounts of the same
    path must agree on what they show.
    """
    volumes = {volume["name"] for volume in (pod.get("spec") or {}).get("volumes") or []}
    links: dict[Path, Path] = {}
    for container in all_containers(pod):
        for mount in container.get("volumeMounts") or []:
            name = mount["name"]
            if name not in volumes:
                raise ConfigError(f'volumeMount "{name}" refers to no volume of the pod')
            if mount.get("subPathExpr"):
                raise ConfigError(f'volumeMount "{name}": subPathExpr is not supported')
            target = volume_dir(pod_directory, name)
            if mount.get("subPath"):
                target = target / _relative(mount["subPath"], "subPath")
            link = mount_root(pod_directory) / _relative(mount["mountPath"], "mountPath")
            if links.setdefault(link, target) != target:
                raise ConfigError(f'mountPath "{mount["mountPath"]}" mounts two different volumes')
    return links


def container_mounts(pod: JSON, container: JSON, pod_directory: Path) -> list[Mount]:
    """The bind mounts of ``container``, shallowest ``mountPath`` first.

    A parent path is mounted before the paths inside it, so a mount at
    ``/etc/app/extra`` lands inside the one at ``/etc/app`` rather than under it.
    """
    volumes = {volume["name"]: volume for volume in (pod.get("spec") or {}).get("volumes") or []}
    mounts: list[Mount] = []
    targets: set[str] = set()
    for mount in container.get("volumeMounts") or []:
        name = mount["name"]
        volume = volumes.get(name)
        if volume is None:
            raise ConfigError(f'volumeMount "{name}" refers to no volume of the pod')
        if mount.get("subPathExpr"):
            raise ConfigError(f'volumeMount "{name}": subPathExpr is not supported')
        root = volume_dir(pod_directory, name)
        source = root / _relative(mount["subPath"], "subPath") if mount.get("subPath") else root
        target = "/" + str(_relative(mount["mountPath"], "mountPath"))
        if target in targets:
            raise ConfigError(f'mountPath "{mount["mountPath"]}" is mounted twice')
        targets.add(target)
        read_only = bool(mount.get("readOnly")) or any(kind in volume for kind in API_DATA_VOLUMES)
        mounts.append(Mount(name, str(source), target, read_only, str(root)))
    return sorted(mounts, key=lambda mount: len(PurePosixPath(mount.target).parts))


def _items(
    data: Mapping[str, bytes], items: Iterable[JSON] | None, default_mode: int, what: str
) -> dict[str, File]:
    if not items:
        return {key: File(value, default_mode) for key, value in data.items()}
    files = {}
    for item in items:
        if item["key"] not in data:
            raise ConfigError(f'{what} has no key "{item["key"]}"')
        path = str(_relative(item["path"], "item path"))
        files[path] = File(data[item["key"]], item.get("mode", default_mode))
    return files


def _object_files(
    data: Mapping[str, bytes] | None, source: JSON, name: str, kind: str, default_mode: int
) -> dict[str, File]:
    if data is None:
        if source.get("optional"):
            return {}
        raise ConfigError(f'{kind} "{name}" not found')
    return _items(data, source.get("items"), default_mode, f'{kind} "{name}"')


def _downward_files(
    items: Iterable[JSON], pod: JSON, default_mode: int, *, pod_ip: str, host_ip: str
) -> dict[str, File]:
    files = {}
    for item in items:
        if "fieldRef" not in item:
            raise ConfigError(f'downwardAPI item "{item.get("path")}": only fieldRef is supported')
        value = field_value(pod, item["fieldRef"]["fieldPath"], pod_ip=pod_ip, host_ip=host_ip)
        path = str(_relative(item["path"], "item path"))
        files[path] = File(value.encode(), item.get("mode", default_mode))
    return files


def _projected_files(
    projected: JSON, pod: JSON, sources: Sources, token: TokenSource, *, pod_ip: str, host_ip: str
) -> dict[str, File]:
    mode = projected.get("defaultMode", DEFAULT_MODE)
    files: dict[str, File] = {}
    for projection in projected.get("sources") or []:
        if "configMap" in projection:
            source = projection["configMap"]
            data = sources.config_map_files(source["name"])
            files.update(_object_files(data, source, source["name"], "configmap", mode))
        elif "secret" in projection:
            source = projection["secret"]
            data = sources.secret_files(source["name"])
            files.update(_object_files(data, source, source["name"], "secret", mode))
        elif "downwardAPI" in projection:
            items = projection["downwardAPI"].get("items") or []
            files.update(_downward_files(items, pod, mode, pod_ip=pod_ip, host_ip=host_ip))
        elif "serviceAccountToken" in projection:
            source = projection["serviceAccountToken"]
            seconds = source.get("expirationSeconds", DEFAULT_TOKEN_EXPIRATION_SECONDS)
            value = token(source.get("audience") or None, seconds)
            path = str(_relative(source["path"], "token path"))
            files[path] = File(value.encode(), mode)
        else:
            raise ConfigError(f"unsupported projected volume source {sorted(projection)}")
    return files


def plan_volume(
    volume: JSON,
    pod: JSON,
    sources: Sources,
    token: TokenSource,
    *,
    pod_ip: str,
    host_ip: str,
) -> VolumePlan:
    """What the directory of ``volume`` must hold."""
    if "emptyDir" in volume:
        return EmptyDir()
    if "hostPath" in volume:
        host_path = volume["hostPath"]
        return HostPath(host_path["path"], host_path.get("type") == "DirectoryOrCreate")
    if "configMap" in volume:
        source = volume["configMap"]
        data = sources.config_map_files(source["name"])
        mode = source.get("defaultMode", DEFAULT_MODE)
        return Files(_object_files(data, source, source["name"], "configmap", mode))
    if "secret" in volume:
        source = volume["secret"]
        data = sources.secret_files(source["secretName"])
        mode = source.get("defaultMode", DEFAULT_MODE)
        return Files(_object_files(data, source, source["secretName"], "secret", mode))
    if "downwardAPI" in volume:
        source = volume["downwardAPI"]
        mode = source.get("defaultMode", DEFAULT_MODE)
        items = source.get("items") or []
        return Files(_downward_files(items, pod, mode, pod_ip=pod_ip, host_ip=host_ip))
    if "projected" in volume:
        return Files(
            _projected_files(
                volume["projected"], pod, sources, token, pod_ip=pod_ip, host_ip=host_ip
            )
        )
    kinds = sorted(key for key in volume if key != "name")
    raise ConfigError(f'volume "{volume["name"]}": type {kinds} is not supported')


def _write_file(path: Path, file: File) -> None:
    try:
        unchanged = path.read_bytes() == file.data and (path.stat().st_mode & 0o777) == file.mode
    except OSError:
        unchanged = False
    if unchanged:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(file.data)
        os.chmod(temporary, file.mode)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _replace_symlink(link: Path, target: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.is_file():
        link.unlink()
    link.symlink_to(target)


def write_volume(directory: Path, plan: VolumePlan) -> None:
    """Make ``directory`` match ``plan``; each file is replaced atomically, stale ones go."""
    if isinstance(plan, HostPath):
        if plan.create:
            Path(plan.path).mkdir(parents=True, exist_ok=True)
        _replace_symlink(directory, Path(plan.path))
        return
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(plan, EmptyDir):
        return
    for relative, file in plan.files.items():
        _write_file(directory / relative, file)
    wanted = {directory / relative for relative in plan.files}
    for root, dirs, names in os.walk(directory, topdown=False):
        for name in names:
            path = Path(root) / name
            if path not in wanted:
                path.unlink()
        for name in dirs:
            path = Path(root) / name
            if not any(path.iterdir()):
                path.rmdir()


def write_mount_links(links: Mapping[Path, Path]) -> None:
    for link, target in links.items():
        _replace_symlink(link, target)
