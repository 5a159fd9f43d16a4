"""The gateway's auth against the real API server: ServiceAccount tokens by TokenReview, API
keys from labelled Secrets, RBAC by SubjectAccessReview on ``invoke``, the caches' TTLs
(with a clock the test moves, so nothing waits a TTL out), and the Kubernetes client's own
credentials (kubeconfig, or a pod's token that the kubelet rotates)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml
from troupe_gateway.auth import (
    ACCESS_TTL_SECONDS,
    KEYS_TTL_SECONDS,
    TOKEN_TTL_SECONDS,
    Caller,
    KubernetesAuthorizer,
    Refused,
)
from troupe_gateway.kube import (
    Connection,
    Kube,
    KubeUnavailable,
    in_cluster_connection,
    kubeconfig_connection,
)

from tests.integration.runtime_harness import eventually
from troupe_devcluster.fixtures import ClusterEndpoints

KEY = "k3y-0f-at-least-sixteen-bytes-0123456789"


class Clock:
    """The caches' clock: the test moves it past a TTL instead of waiting the TTL out."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
async def kube(kubeconfig: Path) -> AsyncIterator[Kube]:
    client = Kube.from_environment({"KUBECONFIG": str(kubeconfig)})
    yield client
    await client.aclose()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def authorizer(kube: Kube, clock: Clock) -> KubernetesAuthorizer:
    return KubernetesAuthorizer(kube, clock=clock)


def apply(cluster: ClusterEndpoints, namespace: str, *objects: dict[str, object]) -> None:
    cluster.kubectl("-n", namespace, "create", "-f", "-", stdin=yaml.safe_dump_all(objects))


def service_account(cluster: ClusterEndpoints, namespace: str, name: str) -> str:
    """A new ServiceAccount's token, as ``kubectl create token`` hands it out."""
    cluster.kubectl("-n", namespace, "create", "serviceaccount", name)
    return cluster.kubectl("-n", namespace, "create", "token", name).strip()


def grant_invoke(
    cluster: ClusterEndpoints, namespace: str, account: str, resource: str, name: str
) -> str:
    """A Role allowing ``invoke`` on one object, bound to the account; returns the binding."""
    binding = f"invoke-{resource}-{name}-{account}"
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": binding},
            "rules": [
                {
                    "apiGroups": ["troupe.dev"],
                    "resources": [resource],
                    "resourceNames": [name],
                    "verbs": ["invoke"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": binding},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": binding},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
        },
    )
    return binding


async def can_invoke(kube: Kube, namespace: str, account: str, resource: str, name: str) -> bool:
    """RBAC's own view, uncached (``kubectl auth can-i`` resolves resources by discovery,
    and no CRD need be installed for a virtual verb)."""
    review = await kube.access_review(
        f"system:serviceaccount:{namespace}:{account}",
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}"),
        namespace=namespace,
        verb="invoke",
        group="troupe.dev",
        resource=resource,
        name=name,
    )
    return review.ok


async def cannot_invoke(kube: Kube, namespace: str, account: str, resource: str, name: str) -> bool:
    return not await can_invoke(kube, namespace, account, resource, name)


def key_secret(
    name: str, key: str, account: str | None, labelled: bool = True
) -> dict[str, object]:
    metadata: dict[str, object] = {"name": name}
    if labelled:
        metadata["labels"] = {"troupe.dev/api-key": "true"}
    if account is not None:
        metadata["annotations"] = {"troupe.dev/service-account": account}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": metadata, "stringData": {"key": key}}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def refusal(awaitable: object) -> Refused:
    with pytest.raises(Refused) as caught:
        await awaitable  # type: ignore[misc]
    return caught.value


async def test_a_token_bound_to_invoke_an_agent_may_call_it(
    cluster: ClusterEndpoints, namespace: str, kube: Kube, authorizer: KubernetesAuthorizer
) -> None:
    token = service_account(cluster, namespace, "caller")
    grant_invoke(cluster, namespace, "caller", "agents", "greeter")

    caller = await authorizer.authenticate(bearer(token), namespace)

    assert caller.user == f"system:serviceaccount:{namespace}:caller"
    assert caller.via == "token"
    assert f"system:serviceaccounts:{namespace}" in caller.groups
    await eventually(lambda: can_invoke(kube, namespace, "caller", "agents", "greeter"), "RBAC")
    await authorizer.authorize(caller, namespace, "agents", "greeter")


async def test_the_same_token_for_another_agent_is_refused_403_with_a_reason(
    cluster: ClusterEndpoints, namespace: str, authorizer: KubernetesAuthorizer
) -> None:
    token = service_account(cluster, namespace, "caller")
    grant_invoke(cluster, namespace, "caller", "agents", "greeter")
    caller = await authorizer.authenticate(bearer(token), namespace)

    refused = await refusal(authorizer.authorize(caller, namespace, "agents", "other"))
    assert refused.status == 403
    assert f"system:serviceaccount:{namespace}:caller" in refused.reason
    assert "'other'" in refused.reason
    assert "invoke" in refused.reason
    refused = await refusal(authorizer.authorize(caller, namespace, "workflows", "greeter"))
    assert refused.status == 403
    assert "workflows" in refused.reason


def forged_jwt(expired: bool) -> str:
    """A JWT with a ServiceAccount's claims, signed by no key the cluster knows."""

    def part(value: Mapping[str, object]) -> str:
        return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()

    claims = {
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": "system:serviceaccount:default:default",
        "exp": 1_000_000_000 if expired else 4_000_000_000,
    }
    return f"{part({'alg': 'RS256', 'kid': 'x'})}.{part(claims)}.{'A' * 342}"


@pytest.mark.parametrize("token", ["garbage", forged_jwt(expired=True), forged_jwt(expired=False)])
async def test_a_garbage_forged_or_expired_token_is_refused_401(
    namespace: str,
    authorizer: KubernetesAuthorizer,
    token: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.DEBUG):
        refused = await refusal(authorizer.authenticate(bearer(token), namespace))
    assert refused.status == 401
    assert refused.headers["WWW-Authenticate"].startswith("Bearer")
    assert token not in refused.reason
    assert token not in caplog.text


async def test_a_revoked_token_is_refused_once_the_token_cache_expires(
    cluster: ClusterEndpoints,
    namespace: str,
    kube: Kube,
    authorizer: KubernetesAuthorizer,
    clock: Clock,
) -> None:
    token = service_account(cluster, namespace, "leaver")
    await authorizer.authenticate(bearer(token), namespace)
    cluster.kubectl("-n", namespace, "delete", "serviceaccount", "leaver")

    async def revoked() -> bool:
        return not (await kube.token_review(token)).ok

    await eventually(revoked, "the deleted ServiceAccount's token to stop authenticating")
    # Within the TTL the cached answer stands; past it the API server is asked again.
    clock.advance(TOKEN_TTL_SECONDS - 1)
    await authorizer.authenticate(bearer(token), namespace)
    clock.advance(1.01)
    refused = await refusal(authorizer.authenticate(bearer(token), namespace))
    assert refused.status == 401


async def test_a_revoked_rolebinding_stops_working_within_the_access_ttl(
    cluster: ClusterEndpoints,
    namespace: str,
    kube: Kube,
    authorizer: KubernetesAuthorizer,
    clock: Clock,
) -> None:
    token = service_account(cluster, namespace, "caller")
    binding = grant_invoke(cluster, namespace, "caller", "agents", "greeter")
    caller = await authorizer.authenticate(bearer(token), namespace)
    await eventually(lambda: can_invoke(kube, namespace, "caller", "agents", "greeter"), "RBAC")
    await authorizer.authorize(caller, namespace, "agents", "greeter")

    cluster.kubectl("-n", namespace, "delete", "rolebinding", binding)
    await eventually(
        lambda: cannot_invoke(kube, namespace, "caller", "agents", "greeter"),
        "RBAC to see the binding gone",
    )
    clock.advance(ACCESS_TTL_SECONDS - 1)
    await authorizer.authorize(caller, namespace, "agents", "greeter")
    clock.advance(1.01)
    refused = await refusal(authorizer.authorize(caller, namespace, "agents", "greeter"))
    assert refused.status == 403


async def test_an_api_key_acts_as_its_service_account(
    cluster: ClusterEndpoints, namespace: str, kube: Kube, authorizer: KubernetesAuthorizer
) -> None:
    cluster.kubectl("-n", namespace, "create", "serviceaccount", "robot")
    grant_invoke(cluster, namespace, "robot", "workflows", "pipeline")
    apply(cluster, namespace, key_secret("robot-key", KEY + "\n", "robot"))

    caller = await authorizer.authenticate({"x-api-key": KEY}, namespace)

    assert caller == Caller(
        f"system:serviceaccount:{namespace}:robot",
        ("system:serviceaccounts", f"system:serviceaccounts:{namespace}"),
        "api-key",
    )
    await eventually(lambda: can_invoke(kube, namespace, "robot", "workflows", "pipeline"), "RBAC")
    await authorizer.authorize(caller, namespace, "workflows", "pipeline")
    refused = await refusal(authorizer.authorize(caller, namespace, "agents", "pipeline"))
    assert refused.status == 403


async def test_a_wrong_key_or_a_key_of_another_namespace_is_refused_401(
    cluster: ClusterEndpoints, namespace: str, authorizer: KubernetesAuthorizer
) -> None:
    apply(cluster, namespace, key_secret("robot-key", KEY, "robot"))

    for headers, where in (
        ({"X-API-Key": KEY[:-1] + "X"}, namespace),
        ({"X-API-Key": KEY}, "default"),
    ):
        refused = await refusal(authorizer.authenticate(headers, where))
        assert refused.status == 401
        assert KEY not in refused.reason


@pytest.mark.parametrize(
    ("secret", "why"),
    [
        (key_secret("unlabelled", KEY, "robot", labelled=False), "no label"),
        (key_secret("unannotated", KEY, None), "no service account annotation"),
        (key_secret("bad-account", KEY, "Not_A_Name"), "an invalid account name"),
        (key_secret("short", KEY[:15], "robot"), "a key under 16 bytes"),
    ],
)
async def test_a_key_secret_breaking_the_rules_is_ignored(
    cluster: ClusterEndpoints,
    namespace: str,
    authorizer: KubernetesAuthorizer,
    secret: dict[str, object],
    why: str,
) -> None:
    apply(cluster, namespace, secret)
    key = KEY[:15] if why == "a key under 16 bytes" else KEY
    refused = await refusal(authorizer.authenticate({"X-API-Key": key}, namespace))
    assert refused.status == 401, why


async def test_a_deleted_key_secret_stops_working_within_the_keys_ttl(
    cluster: ClusterEndpoints, namespace: str, authorizer: KubernetesAuthorizer, clock: Clock
) -> None:
    apply(cluster, namespace, key_secret("robot-key", KEY, "robot"))
    await authorizer.authenticate({"X-API-Key": KEY}, namespace)
    cluster.kubectl("-n", namespace, "delete", "secret", "robot-key")

    clock.advance(KEYS_TTL_SECONDS - 1)
    await authorizer.authenticate({"X-API-Key": KEY}, namespace)
    clock.advance(1.01)
    refused = await refusal(authorizer.authenticate({"X-API-Key": KEY}, namespace))
    assert refused.status == 401


async def test_one_key_in_secrets_of_two_accounts_is_refused(
    cluster: ClusterEndpoints, namespace: str, authorizer: KubernetesAuthorizer
) -> None:
    apply(
        cluster,
        namespace,
        key_secret("first", KEY, "robot"),
        key_secret("second", KEY, "other-robot"),
    )
    refused = await refusal(authorizer.authenticate({"X-API-Key": KEY}, namespace))
    assert refused.status == 401


async def test_secrets_are_read_decoded_and_listed_by_label(
    cluster: ClusterEndpoints, namespace: str, kube: Kube
) -> None:
    apply(
        cluster,
        namespace,
        key_secret("labelled", KEY, "robot"),
        key_secret("plain", KEY, "robot", labelled=False),
    )
    assert await kube.secret(namespace, "plain") == {"key": KEY.encode()}
    assert await kube.secret(namespace, "missing") is None
    assert await kube.secret(namespace, "../../../api") is None
    listed = await kube.secrets(namespace, "troupe.dev/api-key=true")
    assert listed == [("labelled", {"troupe.dev/service-account": "robot"}, {"key": KEY.encode()})]


async def test_an_api_server_that_cannot_answer_is_503_and_never_hangs(
    kubeconfig: Path, namespace: str
) -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read()  # reads the TLS hello and answers nothing
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    real = kubeconfig_connection([kubeconfig])
    for url in (f"https://127.0.0.1:{port}", "https://127.0.0.1:1"):
        kube = Kube(Connection(server=url, ca_pem=real.ca_pem, token="t0ken"), timeout=0.5)
        try:
            authorizer = KubernetesAuthorizer(kube)
            refused = await refusal(authorizer.authenticate(bearer("t0ken"), namespace))
            assert refused.status == 503
            assert refused.headers == {"Retry-After": "1"}
            refused = await refusal(authorizer.authenticate({"X-API-Key": KEY}, namespace))
            assert refused.status == 503
        finally:
            await kube.aclose()
    server.close()
    await server.wait_closed()


async def test_the_pods_token_is_read_again_when_the_kubelet_rotates_it(
    cluster: ClusterEndpoints, namespace: str, kubeconfig: Path, tmp_path: Path
) -> None:
    """In a pod: the token and CA from the mounted ServiceAccount directory, the server from
    ``KUBERNETES_SERVICE_HOST``/``PORT``. The first token may not create TokenReviews; the
    rotated one (another account's, bound to system:auth-delegator) may."""
    weak = service_account(cluster, namespace, "weak")
    strong = service_account(cluster, namespace, "strong")
    cluster.kubectl(
        "create",
        "clusterrolebinding",
        f"{namespace}-strong",
        "--clusterrole=system:auth-delegator",
        f"--serviceaccount={namespace}:strong",
    )
    try:
        real = kubeconfig_connection([kubeconfig])
        assert real.ca_pem is not None
        (tmp_path / "ca.crt").write_text(real.ca_pem)
        (tmp_path / "token").write_text(weak)
        server = urlsplit(real.server)
        environ = {
            "KUBERNETES_SERVICE_HOST": str(server.hostname),
            "KUBERNETES_SERVICE_PORT": str(server.port),
        }
        connection = in_cluster_connection(environ, tmp_path)
        assert connection is not None
        kube = Kube(connection)
        try:
            with pytest.raises(KubeUnavailable):
                await kube.token_review(weak)
            # The kubelet's way: a new file swapped in atomically.
            (tmp_path / "token.new").write_text(strong)
            os.replace(tmp_path / "token.new", tmp_path / "token")

            async def reviewed() -> bool:
                try:
                    return (await kube.token_review(weak)).ok
                except KubeUnavailable:
                    return False

            await eventually(reviewed, "a TokenReview with the rotated token")
        finally:
            await kube.aclose()
    finally:
        cluster.kubectl("delete", "clusterrolebinding", f"{namespace}-strong")
