"""The only module that talks to the Kubernetes API (besides kopf itself).

The kubernetes client is synchronous, so every call runs in a worker thread;
responses are read as plain JSON dicts (``_preload_content=False``), which is
what the pure builders produce and what is cheap to parse at scale. Every call
has a request timeout: without one, a stalled API server connection would hang a
pass, and the lock it holds, for good.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from troupe_operator.api import GROUP, VERSION
from troupe_operator.builders.autoscale import KEDA_GROUP, KEDA_VERSION, SCALED_OBJECTS
from troupe_operator.builders.pods import FIELD_MANAGER

APPLY_PATCH = "application/apply-patch+yaml"
MERGE_PATCH = "application/merge-patch+json"
CONNECTION_POOL_SIZE = 32
REQUEST_TIMEOUT_SECONDS = (5.0, 30.0)
"""(connect, read): how long a call may wait to connect, then between bytes of the answer."""


REJECTION_STATUSES = frozenset({400, 413, 422})
"""What the API server answers when the object itself is at fault, not the operator."""
EVENT_COMPONENT = "troupe-operator"
logger = logging.getLogger(__name__)


class Conflict(Exception):
    """The object changed since it was read: read it again and recompute."""


@dataclass(frozen=True)
class Cause:
    """One field the API server refused, as ``metav1.StatusCause``."""

    field: str
    message: str


@dataclass
class Rejected(Exception):
    """The API server refused an object as invalid (400, 413, 422): its message, and the
    fields it named."""

    kind: str
    name: str
    message: str
    causes: list[Cause] = field(default_factory=list)

    def __str__(self) -> str:
        return f"the API server refused {self.kind} {self.name}: {self.message}"


def _rejected(kind: str, name: str, error: ApiException) -> Rejected:
    try:
        body = json.loads(error.body or "{}")
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    details = body.get("details") or {}
    causes = [
        Cause(str(cause.get("field") or ""), str(cause.get("message") or ""))
        for cause in details.get("causes") or []
        if isinstance(cause, dict)
    ]
    message = str(body.get("message") or error.reason or f"HTTP {error.status}")
    return Rejected(kind, name, message, causes)


def new_api_client() -> client.ApiClient:
    """In a pod, the pod's ServiceAccount; elsewhere, ``$KUBECONFIG`` or ``~/.kube/config``."""
    configuration = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    except config.ConfigException:
        config.load_kube_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    configuration.connection_pool_maxsize = CONNECTION_POOL_SIZE
    api_client = client.ApiClient(configuration)
    api_client.user_agent = FIELD_MANAGER
    return api_client


def _json(response: Any) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(response.data)
    return body


class Kube:
    """Typed-enough async access to the objects the operator reads and writes."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self._core: Any = client.CoreV1Api(api_client)
        self._apps: Any = client.AppsV1Api(api_client)
        self._custom: Any = client.CustomObjectsApi(api_client)
        self._autoscaling: Any = client.AutoscalingV2Api(api_client)
        self._extensions: Any = client.ApiextensionsV1Api(api_client)

    async def _call(self, method: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        response = await asyncio.to_thread(
            method,
            *args,
            _preload_content=False,
            _request_timeout=REQUEST_TIMEOUT_SECONDS,
            **kwargs,
        )
        return _json(response)

    async def _read_or_none(
        self, method: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> dict[str, Any] | None:
        try:
            return await self._call(method, *args, **kwargs)
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def _scaled_object(self, method: Callable[..., Any]) -> Callable[..., Any]:
        """A namespaced call on KEDA's ScaledObjects, taking (name, namespace, ...)."""

        def call(name: str, namespace: str, *args: Any, **kwargs: Any) -> Any:
            return method(
                KEDA_GROUP, KEDA_VERSION, namespace, SCALED_OBJECTS, name, *args, **kwargs
            )

        return call

    async def apply(self, manifest: dict[str, Any], manager: str = FIELD_MANAGER) -> dict[str, Any]:
        """Server-side apply ``manifest`` as ``manager`` (the operator's field manager unless
        told); return the object.

        ``Rejected`` when the API server refuses the object as invalid.
        """
        patchers = {
            "ConfigMap": self._core.patch_namespaced_config_map,
            "ServiceAccount": self._core.patch_namespaced_service_account,
            "Deployment": self._apps.patch_namespaced_deployment,
            "ScaledObject": self._scaled_object(self._custom.patch_namespaced_custom_object),
        }
        metadata = manifest["metadata"]
        try:
            return await self._call(
                patchers[manifest["kind"]],
                metadata["name"],
                metadata["namespace"],
                manifest,
                field_manager=manager,
                force=True,
                _content_type=APPLY_PATCH,
            )
        except ApiException as error:
            if error.status in REJECTION_STATUSES:
                raise _rejected(manifest["kind"], metadata["name"], error) from error
            raise

    async def read(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        """A ConfigMap, ServiceAccount or Deployment the operator would write, or None."""
        readers = {
            "ConfigMap": self._core.read_namespaced_config_map,
            "ServiceAccount": self._core.read_namespaced_service_account,
            "Deployment": self._apps.read_namespaced_deployment,
            "ScaledObject": self._scaled_object(self._custom.get_namespaced_custom_object),
        }
        return await self._read_or_none(readers[kind], name, namespace)

    async def list_autoscalers(self, namespace: str) -> list[dict[str, Any]]:
        """The namespace's HorizontalPodAutoscalers (KEDA's included: it makes one per
        ScaledObject)."""
        listing = await self._call(
            self._autoscaling.list_namespaced_horizontal_pod_autoscaler, namespace
        )
        items: list[dict[str, Any]] = listing["items"]
        return items

    async def has_crd(self, name: str) -> bool:
        """Whether the cluster serves the CustomResourceDefinition ``name`` (such as KEDA's
        scaledobjects.keda.sh)."""
        found = await self._read_or_none(self._extensions.read_custom_resource_definition, name)
        return found is not None

    async def config_map_keys(self, namespace: str, name: str) -> set[str] | None:
        """The keys of a ConfigMap (``data`` and ``binaryData``), or None when it does not
        exist."""
        found = await self.read("ConfigMap", namespace, name)
        if found is None:
            return None
        return {*(found.get("data") or {}), *(found.get("binaryData") or {})}

    async def list_pods(self, namespace: str, match_labels: dict[str, str]) -> list[dict[str, Any]]:
        selector = ",".join(f"{key}={value}" for key, value in sorted(match_labels.items()))
        listing = await self._call(
            self._core.list_namespaced_pod, namespace, label_selector=selector
        )
        items: list[dict[str, Any]] = listing["items"]
        return items

    async def read_namespace(self, name: str) -> dict[str, Any] | None:
        """The Namespace (its labels say whether ChaosExperiments may target it), or None."""
        return await self._read_or_none(self._core.read_namespace, name)

    async def delete_pod(self, namespace: str, name: str, grace_seconds: int | None) -> bool:
        """Delete a pod (a ChaosExperiment's kill): ``grace_seconds`` None keeps the pod's own
        grace period, 0 kills at once. False when it was gone already."""
        options: dict[str, Any] = {}
        if grace_seconds is not None:
            options["grace_period_seconds"] = grace_seconds
        found = await self._read_or_none(
            self._core.delete_namespaced_pod, name, namespace, **options
        )
        return found is not None

    async def create_event(
        self,
        regarding: dict[str, str],
        type: Literal["Normal", "Warning"],
        reason: str,
        message: str,
    ) -> None:
        """Record a core v1 Event about ``regarding`` (apiVersion, kind, name, namespace,
        uid), for ``kubectl describe``. An Event that cannot be written is logged, never
        raised: it must not fail the pass it reports on."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        namespace = regarding["namespace"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "name": f"{regarding['name']}.{uuid.uuid4().hex[:16]}",
                "namespace": namespace,
            },
            "involvedObject": regarding,
            "type": type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": EVENT_COMPONENT},
            "reportingComponent": EVENT_COMPONENT,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            await self._call(self._core.create_namespaced_event, namespace, event)
        except ApiException as error:
            logger.warning("could not record Event %s on %s: %s", reason, regarding, error.reason)

    async def read_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self.read("Deployment", namespace, name)

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        """Delete a ConfigMap, Deployment or ScaledObject; one already gone is fine.
        Dependents go in the background (the garbage collector removes a Deployment's
        pods)."""
        deleters = {
            "ConfigMap": self._core.delete_namespaced_config_map,
            "Deployment": self._apps.delete_namespaced_deployment,
            "ScaledObject": self._scaled_object(self._custom.delete_namespaced_custom_object),
        }
        await self._read_or_none(deleters[kind], name, namespace, propagation_policy="Background")

    async def read_secret(self, namespace: str, name: str) -> dict[str, bytes] | None:
        """The Secret's decoded data, or None when it does not exist."""
        secret = await self._read_or_none(self._core.read_namespaced_secret, name, namespace)
        if secret is None:
            return None
        return {key: base64.b64decode(value) for key, value in (secret.get("data") or {}).items()}

    async def read_custom(self, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read_or_none(
            self._custom.get_namespaced_custom_object, GROUP, VERSION, namespace, plural, name
        )

    async def create_custom(
        self, plural: str, namespace: str, body: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Create a troupe.dev object; None when one of that name exists already (made by a
        pass that raced this one: the caller reads it)."""
        try:
            return await self._call(
                self._custom.create_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                plural,
                body,
                field_manager=FIELD_MANAGER,
            )
        except ApiException as error:
            if error.status == 409:
                return None
            if error.status in REJECTION_STATUSES:
                raise _rejected(str(body.get("kind")), body["metadata"]["name"], error) from error
            raise

    async def list_custom(self, plural: str, namespace: str) -> list[dict[str, Any]]:
        listing = await self._call(
            self._custom.list_namespaced_custom_object, GROUP, VERSION, namespace, plural
        )
        items: list[dict[str, Any]] = listing["items"]
        return items

    async def list_watched(self, plural: str, namespaces: tuple[str, ...]) -> list[dict[str, Any]]:
        """The objects of ``plural`` in ``namespaces``, or in every namespace when empty."""
        if namespaces:
            return [item for ns in namespaces for item in await self.list_custom(plural, ns)]
        listing = await self._call(self._custom.list_cluster_custom_object, GROUP, VERSION, plural)
        items: list[dict[str, Any]] = listing["items"]
        return items

    async def patch_status(
        self,
        plural: str,
        namespace: str,
        name: str,
        status: dict[str, Any],
        resource_version: str,
    ) -> None:
        """Replace ``status`` if the object is still at ``resource_version``, else ``Conflict``."""
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        try:
            await self._call(
                self._custom.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                body,
                _content_type=MERGE_PATCH,
            )
        except ApiException as error:
            if error.status == 409:
                raise Conflict(f"{plural}/{namespace}/{name}") from error
            raise
