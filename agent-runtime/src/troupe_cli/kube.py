"""The CLI's Kubernetes calls: who the caller is (a SelfSubjectReview), the namespace's
Approvals, and a decision patched into one; ChaosExperiments listed, read and created.

This is the one module of the CLI that imports the ``kubernetes`` library (``.importlinter``
names it): a person's kubeconfig is what kubectl reads, with exec plugins and auth providers
(cloud logins, OIDC), and the library reads all of it; a hand-written client like the
gateway's (which refuses exec, being a server) would not. The library is an optional extra of
the runtime package (``troupe-runtime[kube]``), so agent images do not carry it; without it
these commands say how to install it. Its calls are synchronous: callers run them in a thread.
Every call has a timeout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from troupe_cli.errors import CliError, Refused

GROUP = "troupe.dev"
VERSION = "v1alpha1"
PLURAL = "approvals"
CHAOS_PLURAL = "chaosexperiments"
MERGE_PATCH = "application/merge-patch+json"
REQUEST_TIMEOUT_SECONDS = (5.0, 30.0)
INSTALL_HINT = "these commands need the kubernetes library: pip install 'troupe-runtime[kube]'"


@dataclass(frozen=True)
class Caller:
    """The caller as the API server authenticates them."""

    user: str
    groups: tuple[str, ...]


def _message(error: Any) -> str:
    """What the API server said (its Status message: an admission policy's, RBAC's)."""
    try:
        body = json.loads(error.body or "{}")
    except (TypeError, ValueError):
        body = {}
    said = body.get("message") if isinstance(body, dict) else None
    return str(said or error.reason or f"HTTP {error.status}")


class Kube:
    """The calls, on the caller's kubeconfig (``path``, else ``$KUBECONFIG`` or
    ``~/.kube/config``; in a pod without one, its ServiceAccount)."""

    def __init__(self, path: Path | None = None) -> None:
        try:
            from kubernetes import client, config
            from kubernetes.client.exceptions import ApiException
        except ImportError as error:
            raise CliError(INSTALL_HINT) from error
        self._api_exception: type[Exception] = ApiException
        configuration = client.Configuration()
        try:
            config.load_kube_config(  # type: ignore[no-untyped-call]
                config_file=str(path) if path else None, client_configuration=configuration
            )
        except (config.ConfigException, OSError) as error:
            if path is not None:
                raise CliError(f"cannot read the kubeconfig {path}: {error}") from error
            try:
                config.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
            except config.ConfigException:
                raise CliError(f"no Kubernetes credentials: {error}") from error
        api = client.ApiClient(configuration)
        self._custom: Any = client.CustomObjectsApi(api)
        self._authentication: Any = client.AuthenticationV1Api(api)

    def _call(self, method: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        try:
            response = method(
                *args, _preload_content=False, _request_timeout=REQUEST_TIMEOUT_SECONDS, **kwargs
            )
        except self._api_exception as error:
            status = getattr(error, "status", None)
            said = _message(error)
            if status in (401, 403, 409, 422):
                raise Refused(said) from error
            if status == 404:
                raise NotFound(said) from error
            raise CliError(f"the API server answered {status}: {said}") from error
        except OSError as error:
            raise CliError(f"cannot reach the API server: {error}") from error
        body: dict[str, Any] = json.loads(response.data)
        return body

    def caller(self) -> Caller:
        """Who the API server says the caller is (authentication.k8s.io/v1)."""
        review = self._call(
            self._authentication.create_self_subject_review,
            {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
        )
        info = (review.get("status") or {}).get("userInfo") or {}
        user = info.get("username")
        if not isinstance(user, str) or not user:
            raise CliError("the API server named no user for these credentials")
        groups = info.get("groups") or []
        return Caller(user, tuple(g for g in groups if isinstance(g, str)))

    def approvals(self, namespace: str | None) -> list[dict[str, Any]]:
        """The Approvals of ``namespace``, or of every namespace when None."""
        if namespace is None:
            listing = self._call(self._custom.list_cluster_custom_object, GROUP, VERSION, PLURAL)
        else:
            listing = self._call(
                self._custom.list_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL
            )
        items: list[dict[str, Any]] = listing.get("items") or []
        return items

    def approval(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(
                self._custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
            )
        except NotFound:
            return None

    def decide(
        self, namespace: str, name: str, decision: dict[str, str], resource_version: str
    ) -> dict[str, Any]:
        """Set ``spec.decision`` if the Approval is still at ``resource_version``; the API
        server's refusal (RBAC, the admission policy, a decision already made) is
        ``Refused`` with its message."""
        patch = {"metadata": {"resourceVersion": resource_version}, "spec": {"decision": decision}}
        return self._call(
            self._custom.patch_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            PLURAL,
            name,
            patch,
            _content_type=MERGE_PATCH,
        )

    def chaos_experiments(self, namespace: str) -> list[dict[str, Any]]:
        listing = self._call(
            self._custom.list_namespaced_custom_object, GROUP, VERSION, namespace, CHAOS_PLURAL
        )
        items: list[dict[str, Any]] = listing.get("items") or []
        return items

    def chaos_experiment(self, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self._call(
                self._custom.get_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                CHAOS_PLURAL,
                name,
            )
        except NotFound:
            return None

    def create_chaos_experiment(self, namespace: str, body: dict[str, Any]) -> dict[str, Any]:
        """Create it; the API server's refusal (schema, CEL, RBAC, a name taken) is
        ``Refused`` with its message."""
        return self._call(
            self._custom.create_namespaced_custom_object,
            GROUP,
            VERSION,
            namespace,
            CHAOS_PLURAL,
            body,
        )


class NotFound(CliError):
    """The object does not exist."""
