"""A container's environment and argv, resolved exactly as the kubelet would.

Pure: the pod, the fetched ConfigMaps/Secrets and the node-provided base
variables in, a dict and an argv out, so every rule is unit-tested. Anything
that cannot be resolved raises ConfigError, which the runtime reports as the
container's ``CreateContainerConfigError`` waiting reason.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import urlsplit

from troupe_devcluster.processnode.sources import JSON, ConfigError, Sources

_SUBSCRIPT = re.compile(r"^metadata\.(labels|annotations)\['(.*)'\]$")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: unknown names stay as written, ``$$`` escapes a ``$``."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            following = text[cursor + 1]
            if following == "$":
                out.append("$")
                advance = 1
            elif following == "(":
                closer = text.find(")", cursor + 2)
                if closer == -1:
                    out.append("$(")
                    advance = 1
                else:
                    name = text[cursor + 2 : closer]
                    out.append(env.get(name, f"$({name})"))
                    advance = closer - cursor
            else:
                out.append("$" + following)
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out.append(text[checkpoint:])
    return "".join(out)


# Node variables a process needs to behave normally; the rest of the node's
# environment (its KUBECONFIG, say) stays out, as it would of a container.
INHERITED_ENV = ("HOME", "USER", "LOGNAME", "LANG", "LC_ALL", "TZ", "TMPDIR")


def api_server_env(server_url: str) -> dict[str, str]:
    """The ``kubernetes`` Service variables, pointing at the API server itself.

    A kubelet sets them from the Service's cluster IP; no cluster IP routes
    here, so they name the address the node reaches the API server at (its
    kubeconfig's ``server``), which is what in-cluster clients need.
    """
    parts = urlsplit(server_url)
    host = parts.hostname or "127.0.0.1"
    port = str(parts.port or (443 if parts.scheme == "https" else 80))
    address = f"tcp://{host}:{port}"
    return {
        "KUBERNETES_SERVICE_HOST": host,
        "KUBERNETES_SERVICE_PORT": port,
        "KUBERNETES_SERVICE_PORT_HTTPS": port,
        "KUBERNETES_PORT": address,
        f"KUBERNETES_PORT_{port}_TCP": address,
        f"KUBERNETES_PORT_{port}_TCP_PROTO": "tcp",
        f"KUBERNETES_PORT_{port}_TCP_PORT": port,
        f"KUBERNETES_PORT_{port}_TCP_ADDR": host,
    }


def base_env(
    pod: JSON,
    *,
    pod_ip: str,
    node_env: Mapping[str, str],
    tool_dir: str,
    api_server: str | None = None,
) -> dict[str, str]:
    """What every container starts from before its own ``envFrom`` and ``env``.

    ``PATH`` is ``tool_dir`` (the directory of the node's Python: the project
    venv's bin, so ``python``, ``nats-server`` and ``kubectl`` resolve) before
    the node's PATH; ``POD_IP`` is the address to bind to; ``HOSTNAME`` is the
    pod's hostname; ``PYTHONUNBUFFERED`` keeps logs timely. With the API
    server's URL, the ``KUBERNETES_SERVICE_*`` variables too (``api_server_env``).
    """
    env = {name: node_env[name] for name in INHERITED_ENV if name in node_env}
    env["PATH"] = tool_dir + ":" + node_env.get("PATH", "/usr/local/bin:/usr/bin:/bin")
    env["PYTHONUNBUFFERED"] = "1"
    spec = pod.get("spec") or {}
    env["HOSTNAME"] = spec.get("hostname") or pod["metadata"]["name"]
    env["POD_IP"] = pod_ip
    if api_server:
        env.update(api_server_env(api_server))
    return env


def _format_map(values: Mapping[str, str]) -> str:
    return "\n".join(f'{key}="{values[key]}"' for key in sorted(values))


def field_value(pod: JSON, path: str, *, pod_ip: str, host_ip: str) -> str:
    """The value of a downward-API ``fieldRef`` path for this pod."""
    metadata = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": metadata.get("name", ""),
        "metadata.namespace": metadata.get("namespace", ""),
        "metadata.uid": metadata.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": host_ip,
        "status.hostIPs": host_ip,
    }
    if path in simple:
        return str(simple[path])
    if path in ("metadata.labels", "metadata.annotations"):
        return _format_map(metadata.get(path.split(".")[1]) or {})
    subscript = _SUBSCRIPT.match(path)
    if subscript:
        return str((metadata.get(subscript.group(1)) or {}).get(subscript.group(2), ""))
    raise ConfigError(f'unsupported fieldRef fieldPath "{path}"')


def _valid_name(name: str) -> bool:
    """Env var names as Kubernetes accepts them: printable ASCII without ``=``."""
    return bool(name) and all(32 <= ord(char) <= 126 and char != "=" for char in name)


def _env_from(source: JSON, namespace: str, sources: Sources) -> dict[str, str]:
    prefix = source.get("prefix", "")
    if "configMapRef" in source:
        ref, kind, data = (
            source["configMapRef"],
            "configmap",
            sources.config_map_text(source["configMapRef"]["name"]),
        )
    elif "secretRef" in source:
        ref, kind, data = (
            source["secretRef"],
            "secret",
            sources.secret_text(source["secretRef"]["name"]),
        )
    else:
        raise ConfigError(f"unsupported envFrom source {sorted(source)}")
    if data is None:
        if ref.get("optional"):
            return {}
        raise ConfigError(f'{kind} "{namespace}/{ref["name"]}" not found')
    # The kubelet skips keys that are not valid names rather than failing the pod.
    return {prefix + key: value for key, value in data.items() if _valid_name(prefix + key)}


def _key_ref(ref: JSON, kind: str, namespace: str, data: dict[str, str] | None) -> str | None:
    if data is None:
        if ref.get("optional"):
            return None
        raise ConfigError(f'{kind} "{namespace}/{ref["name"]}" not found')
    if ref["key"] not in data:
        if ref.get("optional"):
            return None
        raise ConfigError(f"couldn't find key {ref['key']} in {kind} {namespace}/{ref['name']}")
    return data[ref["key"]]


def _value_from(
    value_from: JSON, pod: JSON, sources: Sources, *, pod_ip: str, host_ip: str
) -> str | None:
    namespace = (pod.get("metadata") or {}).get("namespace", "")
    if "configMapKeyRef" in value_from:
        ref = value_from["configMapKeyRef"]
        return _key_ref(ref, "configmap", namespace, sources.config_map_text(ref["name"]))
    if "secretKeyRef" in value_from:
        ref = value_from["secretKeyRef"]
        return _key_ref(ref, "secret", namespace, sources.secret_text(ref["name"]))
    if "fieldRef" in value_from:
        path = value_from["fieldRef"]["fieldPath"]
        return field_value(pod, path, pod_ip=pod_ip, host_ip=host_ip)
    raise ConfigError(f"unsupported valueFrom source {sorted(value_from)}")


def container_env(
    pod: JSON,
    container: JSON,
    sources: Sources,
    *,
    base: Mapping[str, str],
    pod_ip: str,
    host_ip: str,
) -> dict[str, str]:
    """The container's full environment.

    Order as in the kubelet: the node's ``base`` variables, then ``envFrom``
    sources in order, then ``env`` entries in order, each later one winning;
    an ``env`` value may refer to any variable defined before it as ``$(NAME)``.
    An optional reference that is missing leaves its variable unset.
    """
    namespace = (pod.get("metadata") or {}).get("namespace", "")
    env = dict(base)
    for source in container.get("envFrom") or []:
        env.update(_env_from(source, namespace, sources))
    for var in container.get("env") or []:
        if "valueFrom" in var:
            value = _value_from(var["valueFrom"], pod, sources, pod_ip=pod_ip, host_ip=host_ip)
            if value is None:
                continue
        else:
            value = expand(var.get("value", ""), env)
        env[var["name"]] = value
    return env


def container_argv(container: JSON, env: Mapping[str, str]) -> list[str]:
    """``command`` + ``args`` with ``$(VAR)`` expanded; one of them must be given.

    With no image there is no entrypoint to fall back on: ``args`` alone is
    run as the whole argv, and a container with neither is a config error.
    """
    command = [expand(part, env) for part in container.get("command") or []]
    args = [expand(part, env) for part in container.get("args") or []]
    if not command and not args:
        raise ConfigError(
            f'container "{container.get("name")}" has neither command nor args; '
            "the process node has no image entrypoint to run"
        )
    return command + args
