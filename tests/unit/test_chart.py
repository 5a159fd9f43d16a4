"""The Helm chart without a cluster: it lints, renders what each value asks for, grants the
operator exactly the API access it uses (no wildcards), and the committed plain bundle in
deploy/ is the chart's default rendering."""

from __future__ import annotations

import inspect
import json
import re
from typing import Any

import pytest

from tests.chart_support import (
    ALL_OPTIONS,
    CHART,
    DEPLOY,
    GATEWAY,
    GATEWAY_ON,
    NAMESPACE,
    OPERATOR,
    container_env,
    documents,
    of_kind,
    one,
    render,
    render_text,
    run_helm,
)
from troupe_operator import metrics as operator_metrics
from troupe_runtime.serving.metrics import RuntimeMetrics
from troupe_runtime.workflow import service as engine_service

Grant = tuple[str, str, str, str]  # API group, resource, verb, resource name ("" for any)

# What the operator does in a watched namespace; kube.py, reconcile.py and kopf are the source.
NAMESPACED_GRANTS: set[Grant] = {
    *{
        ("troupe.dev", r, v, "")
        for r in (
            "agents",
            "workflows",
            "modelproviders",
            "budgets",
            "triggers",
            "chaosexperiments",
        )
        for v in ("get", "list", "watch", "patch")
    },
    *{
        ("troupe.dev", f"{r}/status", "patch", "")
        for r in (
            "agents",
            "workflows",
            "modelproviders",
            "budgets",
            "triggers",
            "approvals",
            "chaosexperiments",
        )
    },
    # Approvals: mirrored from the buckets (create), decided by people (watch), no delete.
    *{("troupe.dev", "approvals", v, "") for v in ("get", "list", "watch", "create", "patch")},
    *{
        ("apps", "deployments", v, "")
        for v in ("get", "list", "watch", "create", "patch", "delete")
    },
    *{("", "configmaps", v, "") for v in ("get", "create", "patch", "delete")},
    *{("", "serviceaccounts", v, "") for v in ("get", "create", "patch")},
    ("", "secrets", "get", ""),
    ("", "pods", "list", ""),
    # ChaosExperiments' pod kills.
    ("", "pods", "delete", ""),
    ("", "events", "create", ""),
    # Autoscaling: whether an HPA scales an agent, and the ScaledObjects of engine keda.
    ("autoscaling", "horizontalpodautoscalers", "list", ""),
    *{("keda.sh", "scaledobjects", v, "") for v in ("get", "create", "patch", "delete")},
}
CLUSTER_WIDE_GRANTS: set[Grant] = {
    # get: whether the cluster has KEDA's scaledobjects.keda.sh.
    ("apiextensions.k8s.io", "customresourcedefinitions", "get", ""),
    ("apiextensions.k8s.io", "customresourcedefinitions", "list", ""),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch", ""),
    # A ChaosExperiment reads its Namespace's opt-in label.
    ("", "namespaces", "get", ""),
}
# Leader election (clients/lease.py): the one Lease, in the release namespace only.
ELECTION_GRANTS: set[Grant] = {
    ("coordination.k8s.io", "leases", "create", ""),
    *{("coordination.k8s.io", "leases", v, OPERATOR) for v in ("get", "update", "patch")},
}
WATCHED = ["team-a", "team-b"]
# What the gateway asks (auth.py, kube.py): TokenReviews, SubjectAccessReviews cluster-wide,
# and the API-key Secrets of the namespaces it serves.
GATEWAY_REVIEW_GRANTS: set[Grant] = {
    ("authentication.k8s.io", "tokenreviews", "create", ""),
    ("authorization.k8s.io", "subjectaccessreviews", "create", ""),
}
GATEWAY_SECRET_GRANTS: set[Grant] = {("", "secrets", v, "") for v in ("get", "list", "watch")}


def grants(role: dict[str, Any]) -> set[Grant]:
    return {
        (group, resource, verb, name)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
        for name in rule.get("resourceNames", [""])
    }


def bindings_of(
    objects: list[dict[str, Any]], kind: str, account: str = OPERATOR
) -> list[dict[str, Any]]:
    """The bindings of ``kind`` whose subjects include the ServiceAccount ``account``."""
    subject = {"kind": "ServiceAccount", "name": account, "namespace": NAMESPACE}
    return [b for b in of_kind(objects, kind) if subject in b["subjects"]]


def operator_grants(objects: list[dict[str, Any]], account: str = OPERATOR) -> set[Grant]:
    """Everything the ServiceAccount ``account`` (the operator's) is bound to, in the
    cluster or a namespace."""
    roles = {
        (role["kind"], role["metadata"]["name"]): role
        for role in of_kind(objects, "ClusterRole") + of_kind(objects, "Role")
    }
    bindings = bindings_of(objects, "ClusterRoleBinding", account) + bindings_of(
        objects, "RoleBinding", account
    )
    bound = {(binding["roleRef"]["kind"], binding["roleRef"]["name"]) for binding in bindings}
    return set().union(*(grants(roles[name]) for name in bound))


def grants_in(objects: list[dict[str, Any]], namespace: str) -> set[Grant]:
    """What the operator's Roles grant in ``namespace`` (not its ClusterRoles)."""
    return set().union(
        *(
            grants(role)
            for role in of_kind(objects, "Role")
            if role["metadata"]["namespace"] == namespace
        )
    )


@pytest.mark.parametrize(
    "values", [{}, ALL_OPTIONS, {**ALL_OPTIONS, "watchNamespaces": WATCHED}], ids=str
)
def test_helm_lint_passes(values: dict[str, Any]) -> None:
    sets = [f"--set-json={key}={json.dumps(value)}" for key, value in values.items()]
    run_helm("lint", "--strict", str(CHART), *sets)


@pytest.mark.parametrize("values", [{}, ALL_OPTIONS, {"watchNamespaces": WATCHED}], ids=str)
def test_no_role_has_a_wildcard(values: dict[str, Any]) -> None:
    objects = render(values)
    roles = of_kind(objects, "ClusterRole") + of_kind(objects, "Role")
    assert roles
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs", "resourceNames", "nonResourceURLs"):
                assert "*" not in rule.get(field, []), f"{role['metadata']['name']}: {rule}"


def test_cluster_wide_operator_gets_exactly_what_it_uses() -> None:
    objects = render()
    assert operator_grants(objects) == NAMESPACED_GRANTS | CLUSTER_WIDE_GRANTS | ELECTION_GRANTS
    assert grants_in(objects, NAMESPACE) == ELECTION_GRANTS, "the Lease is the release's own"


def test_namespaced_operator_is_bound_only_in_the_watched_namespaces() -> None:
    objects = render({"watchNamespaces": WATCHED})
    bindings = [
        b for b in bindings_of(objects, "RoleBinding") if b["roleRef"]["kind"] == "ClusterRole"
    ]
    assert sorted(binding["metadata"]["namespace"] for binding in bindings) == WATCHED
    namespaced_role = one(objects, "ClusterRole", bindings[0]["roleRef"]["name"])
    assert grants(namespaced_role) == NAMESPACED_GRANTS
    cluster_bindings = bindings_of(objects, "ClusterRoleBinding")
    assert len(cluster_bindings) == 1, "only kopf's cluster-scoped reads are cluster-wide"
    cluster_role = one(objects, "ClusterRole", cluster_bindings[0]["roleRef"]["name"])
    assert grants(cluster_role) == {
        ("apiextensions.k8s.io", "customresourcedefinitions", "get", ""),
        ("apiextensions.k8s.io", "customresourcedefinitions", "list", ""),
        ("apiextensions.k8s.io", "customresourcedefinitions", "watch", ""),
        ("", "namespaces", "get", ""),
        ("", "namespaces", "list", ""),
        ("", "namespaces", "watch", ""),
    }


def test_namespaced_operator_elects_through_the_lease_in_its_own_namespace() -> None:
    objects = render({"watchNamespaces": WATCHED})
    assert not {obj["kind"] for obj in objects} & {"ClusterKopfPeering", "KopfPeering"}
    assert grants_in(objects, NAMESPACE) == ELECTION_GRANTS
    container = one(objects, "Deployment", OPERATOR)["spec"]["template"]["spec"]["containers"][0]
    assert container_env(container)["TROUPE_WATCH_NAMESPACES"] == "team-a,team-b"


def test_aggregated_roles_extend_the_built_in_view_and_edit_roles() -> None:
    objects = render()
    view = one(objects, "ClusterRole", "troupe-view")
    edit = one(objects, "ClusterRole", "troupe-edit")
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert {verb for (_, _, verb, _) in grants(view)} == {"get", "list", "watch"}
    assert ("troupe.dev", "workflows", "create", "") in grants(edit)
    status_verbs = {verb for (_, resource, verb, _) in grants(edit) if resource.endswith("/status")}
    assert status_verbs == {"get", "list", "watch"}, "status stays the operator's"
    assert ("troupe.dev", "approvals", "patch", "") in grants(edit), "editors may decide"
    assert ("troupe.dev", "approvals", "create", "") not in grants(edit), "the operator's"


def test_the_approver_role_may_decide_approvals_and_nothing_else() -> None:
    approver = one(render(), "ClusterRole", "troupe-approver")
    assert grants(approver) == {
        *{("troupe.dev", "approvals", v, "") for v in ("get", "list", "watch", "patch")},
        ("troupe.dev", "approvals/status", "get", ""),
    }
    assert "rbac.authorization.k8s.io/aggregate-to-edit" not in approver["metadata"]["labels"]


def test_the_approvals_policy_matches_approvals_but_not_their_status_and_is_bound() -> None:
    objects = render()
    (policy,) = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicy"]
    (binding,) = [o for o in objects if o["kind"] == "ValidatingAdmissionPolicyBinding"]
    (rule,) = policy["spec"]["matchConstraints"]["resourceRules"]
    assert rule["resources"] == ["approvals"], "approvals/status writes are not decisions"
    assert set(rule["operations"]) == {"CREATE", "UPDATE"}
    assert policy["spec"]["failurePolicy"] == "Fail"
    assert binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert binding["spec"]["validationActions"] == ["Deny"]


def test_operator_runs_two_elected_replicas_with_liveness_and_readiness_probes() -> None:
    deployment = one(render(), "Deployment", OPERATOR)
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "troupe_operator"]
    assert "args" not in container, "leader election is the default"
    env = container_env(container)
    assert env["TROUPE_LEASE_NAME"] == OPERATOR
    assert (env["TROUPE_LEASE_DURATION"], env["TROUPE_RENEW_DEADLINE"]) == ("10", "7")
    assert env["TROUPE_RETRY_PERIOD"] == "2"
    fields = {
        e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"]
        for e in container["env"]
        if "valueFrom" in e
    }
    assert fields == {
        "POD_IP": "status.podIP",
        "POD_NAME": "metadata.name",
        "POD_NAMESPACE": "metadata.namespace",
    }
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"]["path"] == path
        assert (
            str(ports[container[probe]["httpGet"]["port"]]) == env["TROUPE_HEALTH_PORT"] == "8081"
        )
    assert str(ports["metrics"]) == env["TROUPE_METRICS_PORT"] == "9090"
    assert pod["serviceAccountName"] == OPERATOR


def test_a_standalone_operator_is_one_replica_without_a_lease() -> None:
    objects = render({"operator": {"replicas": 1, "leaderElection": {"enabled": False}}})
    (container,) = one(objects, "Deployment", OPERATOR)["spec"]["template"]["spec"]["containers"]
    assert container["args"] == ["--standalone"]
    assert "readinessProbe" not in container
    assert not of_kind(objects, "Role")


def test_several_standalone_replicas_are_refused() -> None:
    with pytest.raises(AssertionError, match=r"needs operator\.leaderElection\.enabled"):
        render({"operator": {"leaderElection": {"enabled": False}}})


def test_values_reach_the_operators_environment() -> None:
    deployment = one(render(ALL_OPTIONS), "Deployment", OPERATOR)
    pod = deployment["spec"]["template"]["spec"]
    env = container_env(pod["containers"][0])
    assert env["TROUPE_NATS_URL"] == f"nats://troupe-nats.{NAMESPACE}.svc:4222"
    assert env["TROUPE_NATS_CREDENTIALS"] == "/etc/troupe/nats/nats.creds"
    assert env["TROUPE_RUNTIME_IMAGE"] == "troupe/runtime:0.1.0"
    assert env["TROUPE_WATCH_NAMESPACES"] == ""
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["nats-credentials"]["secret"]["secretName"] == "troupe-nats-creds"
    explicit = render({"nats": {"url": "nats://nats.example:4222"}})
    env = container_env(
        one(explicit, "Deployment", OPERATOR)["spec"]["template"]["spec"]["containers"][0]
    )
    assert env["TROUPE_NATS_URL"] == "nats://nats.example:4222"


def test_optional_features_are_off_by_default() -> None:
    kinds = {obj["kind"] for obj in render()}
    assert not kinds & {"StatefulSet", "ServiceMonitor", "PodMonitor", "ConfigMap"}


def test_images_name_no_registry_host() -> None:
    objects = render(ALL_OPTIONS)
    workloads = of_kind(objects, "Deployment") + of_kind(objects, "StatefulSet")
    images = [c["image"] for w in workloads for c in w["spec"]["template"]["spec"]["containers"]]
    assert images == ["troupe/operator:0.1.0", "troupe/runtime:0.1.0", "nats:2.15.1-alpine"]
    for image in images:
        first = image.split("/")[0]
        assert "/" not in image or not ("." in first or ":" in first), image


def test_service_monitor_scrapes_the_metrics_service() -> None:
    objects = render(ALL_OPTIONS)
    (monitor,) = of_kind(objects, "ServiceMonitor")
    service = one(objects, "Service", "troupe-metrics")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    deployment = one(objects, "Deployment", OPERATOR)
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


SAMPLE_SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}


def _exported_metric_names() -> set[str]:
    """The series names the runtime and the operator export; the workflow engine's gauge
    needs a running engine to register, so its name is read from the engine's source."""
    collectors: list[Any] = [
        RuntimeMetrics().registry,
        operator_metrics.RECONCILES,
        operator_metrics.ERRORS,
        operator_metrics.DURATION,
    ]
    families = [family for collector in collectors for family in collector.collect()]
    names = {
        family.name + suffix
        for family in families
        for suffix in SAMPLE_SUFFIXES.get(family.type, [""])
    }
    return names | set(re.findall(r'"(troupe_[a-z_]+)"', inspect.getsource(engine_service)))


def test_dashboard_queries_only_metrics_troupe_exports() -> None:
    (config_map,) = of_kind(render(ALL_OPTIONS), "ConfigMap")
    dashboard = json.loads(config_map["data"]["troupe.json"])
    queried = {
        name
        for panel in dashboard["panels"]
        for target in panel["targets"]
        for name in re.findall(r"\b(troupe_[a-z_]+)[{\[]", target["expr"])
    }
    assert {"troupe_messages_total", "troupe_handler_seconds_bucket"} <= queried
    assert queried - _exported_metric_names() == set()


def test_nats_quick_start_is_a_single_jetstream_node() -> None:
    objects = render(ALL_OPTIONS)
    (statefulset,) = of_kind(objects, "StatefulSet")
    assert statefulset["spec"]["replicas"] == 1
    (container,) = statefulset["spec"]["template"]["spec"]["containers"]
    assert "--jetstream" in container["args"]
    assert one(objects, "Service", "troupe-nats")["spec"]["ports"][0]["port"] == 4222


def test_bundle_is_the_default_rendering() -> None:
    """deploy/ holds exactly the chart's default rendering (CRDs included), plus the
    operator's namespace."""
    rendered = documents(render_text(None, NAMESPACE, "--include-crds"))
    crds = documents((DEPLOY / "crds.yaml").read_text())
    rest = documents((DEPLOY / "troupe.yaml").read_text())
    assert rest[0]["kind"] == "Namespace"
    assert rest[0]["metadata"]["name"] == NAMESPACE
    assert {crd["kind"] for crd in crds} == {"CustomResourceDefinition"}
    assert crds + rest[1:] == rendered


def _gateway_container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = one(objects, "Deployment", GATEWAY)["spec"]["template"]["spec"]["containers"]
    found: dict[str, Any] = container
    return found


def test_the_gateway_runs_two_replicas_of_the_runtime_image_with_probes_on_8080() -> None:
    objects = render(GATEWAY_ON)
    deployment = one(objects, "Deployment", GATEWAY)
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == GATEWAY
    container = _gateway_container(objects)
    assert container["image"] == "troupe/runtime:0.1.0"
    assert container["command"] == ["python", "-m", "troupe_gateway"]
    (port,) = container["ports"]
    assert (port["name"], port["containerPort"]) == ("http", 8080)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        assert container[probe]["httpGet"] == {"path": path, "port": "http", "scheme": "HTTP"}
    env = container_env(container)
    assert env["TROUPE_NATS_URL"] == "nats://nats:4222"
    assert not {"TROUPE_GATEWAY_TLS_CERT", "TROUPE_GATEWAY_PUBLIC_URL"} & env.keys()
    assert container["securityContext"]["readOnlyRootFilesystem"]
    pdb = one(objects, "PodDisruptionBudget", GATEWAY)
    assert pdb["spec"]["selector"]["matchLabels"].items() <= (
        deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_the_gateway_service_sends_port_80_to_the_pods_8080() -> None:
    objects = render(GATEWAY_ON)
    service = one(objects, "Service", GATEWAY)
    (port,) = service["spec"]["ports"]
    assert (port["port"], port["targetPort"]) == (80, "http")
    assert service["spec"]["type"] == "ClusterIP"
    deployment = one(objects, "Deployment", GATEWAY)
    assert (
        service["spec"]["selector"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )
    operator = one(objects, "Deployment", OPERATOR)
    assert not (
        service["spec"]["selector"].items()
        <= operator["spec"]["template"]["metadata"]["labels"].items()
    ), "the gateway Service must not select the operator"
    changed = render({"gateway": {"enabled": True, "service": {"type": "NodePort", "port": 8443}}})
    assert one(changed, "Service", GATEWAY)["spec"]["type"] == "NodePort"
    assert one(changed, "Service", GATEWAY)["spec"]["ports"][0]["port"] == 8443


def test_the_gateway_shares_the_operators_nats_and_its_credentials() -> None:
    objects = render(ALL_OPTIONS)
    env = container_env(_gateway_container(objects))
    operator_env = container_env(
        one(objects, "Deployment", OPERATOR)["spec"]["template"]["spec"]["containers"][0]
    )
    assert env["TROUPE_NATS_URL"] == operator_env["TROUPE_NATS_URL"]
    assert env["TROUPE_NATS_CREDENTIALS"] == operator_env["TROUPE_NATS_CREDENTIALS"]
    pod = one(objects, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["nats-credentials"]["secret"]["secretName"] == "troupe-nats-creds"


def test_gateway_tls_mounts_the_secret_and_probes_over_https() -> None:
    objects = render(
        {
            "gateway": {
                "enabled": True,
                "tls": {"secretName": "gateway-tls"},
                "publicUrl": "https://agents.example",
            }
        }
    )
    container = _gateway_container(objects)
    env = container_env(container)
    assert env["TROUPE_GATEWAY_TLS_CERT"] == "/etc/troupe/tls/tls.crt"
    assert env["TROUPE_GATEWAY_TLS_KEY"] == "/etc/troupe/tls/tls.key"
    assert env["TROUPE_GATEWAY_PUBLIC_URL"] == "https://agents.example"
    mounts = {mount["name"]: mount["mountPath"] for mount in container["volumeMounts"]}
    assert mounts["tls"] == "/etc/troupe/tls"
    pod = one(objects, "Deployment", GATEWAY)["spec"]["template"]["spec"]
    volumes = {volume["name"]: volume for volume in pod["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "gateway-tls"
    assert container["readinessProbe"]["httpGet"]["scheme"] == "HTTPS"
    assert one(objects, "Service", GATEWAY)["spec"]["ports"][0]["name"] == "https"


def test_the_gateway_may_review_tokens_and_access_and_read_api_key_secrets_only() -> None:
    objects = render(GATEWAY_ON)
    assert operator_grants(objects, GATEWAY) == GATEWAY_REVIEW_GRANTS | GATEWAY_SECRET_GRANTS


def test_a_namespaced_gateway_reads_secrets_only_in_the_watched_namespaces() -> None:
    objects = render({**GATEWAY_ON, "watchNamespaces": WATCHED})
    bindings = bindings_of(objects, "RoleBinding", GATEWAY)
    assert sorted(binding["metadata"]["namespace"] for binding in bindings) == WATCHED
    role = one(objects, "ClusterRole", bindings[0]["roleRef"]["name"])
    assert grants(role) == GATEWAY_SECRET_GRANTS
    (cluster_binding,) = bindings_of(objects, "ClusterRoleBinding", GATEWAY)
    cluster_role = one(objects, "ClusterRole", cluster_binding["roleRef"]["name"])
    assert grants(cluster_role) == GATEWAY_REVIEW_GRANTS


def test_troupe_invoker_grants_invoke_on_agents_and_workflows_to_whoever_it_is_bound() -> None:
    objects = render(GATEWAY_ON)
    invoker = one(objects, "ClusterRole", "troupe-invoker")
    assert grants(invoker) == {
        ("troupe.dev", "agents", "invoke", ""),
        ("troupe.dev", "workflows", "invoke", ""),
    }
    assert not [
        b
        for b in of_kind(objects, "ClusterRoleBinding")
        if b["roleRef"]["name"] == "troupe-invoker"
    ], "users bind it"


def test_the_gateway_is_on_by_default_and_off_when_disabled() -> None:
    names = {(obj["kind"], obj["metadata"]["name"]) for obj in render()}
    assert {("Deployment", GATEWAY), ("Service", GATEWAY), ("ClusterRole", "troupe-invoker")} <= (
        names
    )
    disabled = render({"gateway": {"enabled": False}})
    names = {(obj["kind"], obj["metadata"]["name"]) for obj in disabled}
    assert not {name for _, name in names if "gateway" in name or name == "troupe-invoker"}
    assert ("Deployment", OPERATOR) in names
