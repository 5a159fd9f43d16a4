"""Config by mounted file, against the real API server, operator and process node.

An env var string is capped at 128 KiB by Linux; the runtime's config now arrives as a
file from its ConfigMap, so an Agent with a 200 KB schema starts and handles messages.
The size the operator allows a config is checked against the API server's own limit.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from nats.js import JetStreamContext
from nats.js.api import StreamConfig
from nats.js.errors import NotFoundError

from tests.integration.operator_support import (
    OperatorProcess,
    agent,
    explained,
    jetstream,
    running_agent,
    wait_ready,
)
from troupe_devcluster.fixtures import ClusterEndpoints, wait_for
from troupe_devcluster.kube import core_v1
from troupe_operator.builders import pods
from troupe_runtime.contract import envelope, naming, pod
from troupe_runtime.contract.envelope import CloudEvent

DEADLINE = 60.0
ENV_STRING_LIMIT = 128 * 1024
"""Linux's MAX_ARG_STRLEN: the longest one ``NAME=value`` string may be."""


def big_schema(size: int) -> dict[str, Any]:
    """A valid schema of about ``size`` bytes: an array of strings, with many definitions
    whose patterns RE2 compiles."""
    definitions: dict[str, Any] = {}
    index = written = 0
    while written < size:
        definition = {
            "type": "string",
            "pattern": rf"^\p{{L}}[a-z0-9]{{0,{index % 40 + 1}}}$",
            "description": f"definition {index} of a schema large enough to need a file",
        }
        definitions[f"field{index:05d}"] = definition
        written += len(json.dumps(definition, separators=(",", ":"))) + 14
        index += 1
    return {"type": "array", "items": {"type": "string"}, "$defs": definitions}


def _apply_server_side(cluster: ClusterEndpoints, namespace: str, manifest: dict[str, Any]) -> None:
    # Client-side apply would copy the whole object into an annotation, which the API
    # server caps at 256 KiB: server-side apply keeps no such copy.
    cluster.kubectl(
        "apply", "--server-side", "-n", namespace, "-f", "-", stdin=json.dumps(manifest)
    )


def _output(nats_url: str, stream: str) -> Any:
    async def read(js: JetStreamContext) -> Any:
        try:
            msg = await js.get_msg(stream, 1)
        except NotFoundError:
            return None
        return envelope.parse(msg.headers, msg.data or b"").data

    return jetstream(nats_url, read)


def test_an_agent_with_a_200_kb_schema_becomes_ready_and_handles_a_message(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    schema = big_schema(200 * 1024)
    output = f"out.{namespace}.big"
    stream = f"OUT_{namespace}"
    manifest = running_agent("big", contract={"inputSchema": schema, "outputSubjects": [output]})

    async def add_output_stream(js: JetStreamContext) -> None:
        await js.add_stream(StreamConfig(name=stream, subjects=[output]))

    jetstream(cluster.nats_url, add_output_stream)
    with explained(cluster, namespace, operator):
        _apply_server_side(cluster, namespace, manifest)
        wait_ready(cluster, namespace, "agent", "big")

        config = _config_map_data(cluster, namespace, "big-runtime")[pod.CONFIG_FILE_NAME]
        assert len(config) > ENV_STRING_LIMIT

        event = CloudEvent(id=uuid.uuid4().hex, source="/tests", type="test.input", data=["hi"])
        headers, payload = envelope.to_binary(event)

        async def publish(js: JetStreamContext) -> None:
            await js.publish(naming.inbox_subject(namespace, "big", 0), payload, headers=headers)

        jetstream(cluster.nats_url, publish)
        result = wait_for(lambda: _output(cluster.nats_url, stream), DEADLINE, "the output")
        assert result == ["hi", "big"]

    async def remove_output_stream(js: JetStreamContext) -> None:
        await js.delete_stream(stream)

    jetstream(cluster.nats_url, remove_output_stream)


def test_an_agent_whose_schema_outgrows_the_annotations_limit_is_ready_and_deletable(
    cluster: ClusterEndpoints, namespace: str, operator: OperatorProcess
) -> None:
    # kopf keeps the last handled spec in an annotation; all of an object's annotations
    # hold 256 KiB. With the schema copied there, every patch kopf made was refused, so the
    # finalizer stayed forever.
    manifest = agent("large", contract={"inputSchema": big_schema(500 * 1024)})
    with explained(cluster, namespace, operator):
        _apply_server_side(cluster, namespace, manifest)
        wait_ready(cluster, namespace, "agent", "large")

        cluster.kubectl("delete", "-n", namespace, "agent/large", "--timeout=60s")

        assert not cluster.kubectl("get", "-n", namespace, "agents", "-o", "name").strip()


def _config_map_data(cluster: ClusterEndpoints, namespace: str, name: str) -> dict[str, str]:
    body = json.loads(cluster.kubectl("get", "-n", namespace, "configmap", name, "-o", "json"))
    data: dict[str, str] = body["data"]
    return data


def _config_map(name: str, value: str) -> dict[str, Any]:
    return {"metadata": {"name": name}, "data": {pod.CONFIG_FILE_NAME: value}}


def test_the_largest_config_the_operator_writes_fits_a_config_map_and_the_limit_is_real(
    api_client: Any, namespace: str
) -> None:
    core = core_v1(api_client)
    largest = pods.CONFIG_MAP_LIMIT_BYTES - len(pod.CONFIG_FILE_NAME)

    core.create_namespaced_config_map(namespace, _config_map("fits", "x" * largest))
    with pytest.raises(ApiException) as refused:
        core.create_namespaced_config_map(
            namespace, _config_map("over", "x" * (pods.CONFIG_MAP_LIMIT_BYTES + 1))
        )

    assert refused.value.status == 422
    assert len(core.read_namespaced_config_map("fits", namespace).data["config.json"]) == largest
