"""The process node's pod status, Node and Lease builders."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from troupe_devcluster.processnode.status import (
    ContainerView,
    NodeSystem,
    PodView,
    Running,
    Terminated,
    Waiting,
    build_lease,
    build_node,
    build_pod_status,
    cleared_taints,
    container_status,
    pod_phase,
)

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
T1 = T0 + timedelta(seconds=30)
POD_IP = "127.1.0.3"


def _running(name: str = "app", ready: bool = True) -> ContainerView:
    return ContainerView(name, "img:1", Running(41, T0), ready=ready, started=True)


def _exited(code: int, name: str = "app") -> ContainerView:
    return ContainerView(name, "img:1", Terminated(code, "Error" if code else "Completed", T1))


def _backing_off(name: str = "app") -> ContainerView:
    return ContainerView(
        name,
        "img:1",
        Waiting("CrashLoopBackOff", "back-off 1s"),
        last_terminated=Terminated(1, "Error", T1),
        restart_count=1,
    )


def _pod(**spec: Any) -> dict[str, Any]:
    return {"metadata": {"name": "web", "namespace": "shop", "uid": "u"}, "spec": spec}


def _view(*containers: ContainerView, init: tuple[ContainerView, ...] = ()) -> PodView:
    return PodView(POD_IP, T0, list(init), list(containers))


def _conditions(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {condition["type"]: condition for condition in status["conditions"]}


def test_phase_is_pending_while_a_container_has_not_started() -> None:
    waiting = ContainerView("app", "img", Waiting("ContainerCreating"))
    assert pod_phase("Always", [], [waiting, _running("b")]) == "Pending"


def test_phase_is_running_while_a_container_runs() -> None:
    assert pod_phase("Never", [], [_running(), _exited(0, "b")]) == "Running"


def test_phase_stays_running_while_a_container_backs_off_under_always() -> None:
    assert pod_phase("Always", [], [_backing_off()]) == "Running"


def test_phase_is_succeeded_when_every_container_exited_zero() -> None:
    assert pod_phase("OnFailure", [], [_exited(0), _exited(0, "b")]) == "Succeeded"


def test_phase_is_failed_when_a_container_failed_under_never() -> None:
    assert pod_phase("Never", [], [_exited(0), _exited(2, "b")]) == "Failed"


def test_phase_is_running_when_a_failed_container_will_restart_under_on_failure() -> None:
    assert pod_phase("OnFailure", [], [_exited(0), _backing_off("b")]) == "Running"


def test_phase_is_pending_until_init_containers_succeed() -> None:
    assert pod_phase("Always", [_running("init")], [_running()]) == "Pending"


def test_phase_is_failed_when_an_init_container_failed_under_never() -> None:
    waiting = ContainerView("app", "img", Waiting("PodInitializing"))
    assert pod_phase("Never", [_exited(1, "init")], [waiting]) == "Failed"


def test_container_status_reports_running_state_and_process_id() -> None:
    status = container_status(_running())
    assert status["state"] == {
        "waiting": None,
        "running": {"startedAt": "2026-01-02T03:04:05Z"},
        "terminated": None,
    }
    assert status["containerID"] == "process://41"


def test_container_status_reports_last_termination_and_restarts() -> None:
    status = container_status(_backing_off())
    assert status["lastState"]["terminated"]["exitCode"] == 1
    assert status["restartCount"] == 1
    assert status["state"]["waiting"]["reason"] == "CrashLoopBackOff"


def test_container_status_records_the_image_as_given() -> None:
    status = container_status(_running())
    assert (status["image"], status["imageID"]) == ("img:1", "img:1")


def test_status_reports_pod_and_host_ips() -> None:
    status = build_pod_status(_pod(), _view(_running()), None, T0)
    assert (status["podIP"], status["podIPs"]) == (POD_IP, [{"ip": POD_IP}])
    assert status["hostIP"] == "127.0.0.1"


def test_pod_is_ready_when_all_containers_are_ready() -> None:
    status = build_pod_status(_pod(), _view(_running(), _running("b")), None, T0)
    assert _conditions(status)["Ready"]["status"] == "True"


def test_pod_is_not_ready_with_an_unready_container_named_in_the_message() -> None:
    status = build_pod_status(_pod(), _view(_running(), _running("b", ready=False)), None, T0)
    ready = _conditions(status)["Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "ContainersNotReady")
    assert ready["message"] == "containers with unready status: [b]"


def test_condition_keeps_its_transition_time_while_its_status_holds() -> None:
    first = build_pod_status(_pod(), _view(_running()), None, T0)
    second = build_pod_status(_pod(), _view(_running()), first, T1)
    assert second == first


def test_condition_transition_time_moves_when_its_status_changes() -> None:
    first = build_pod_status(_pod(), _view(_running(ready=False)), None, T0)
    second = build_pod_status(_pod(), _view(_running()), first, T1)
    assert _conditions(second)["Ready"]["lastTransitionTime"] == "2026-01-02T03:04:35Z"
    assert _conditions(second)["PodScheduled"]["lastTransitionTime"] == "2026-01-02T03:04:05Z"


def test_unmet_readiness_gate_keeps_the_pod_unready() -> None:
    pod = _pod(readinessGates=[{"conditionType": "example.com/lb"}])
    status = build_pod_status(pod, _view(_running()), None, T0)
    assert _conditions(status)["ContainersReady"]["status"] == "True"
    assert _conditions(status)["Ready"]["reason"] == "ReadinessGatesNotReady"


def test_met_readiness_gate_lets_the_pod_be_ready() -> None:
    pod = _pod(readinessGates=[{"conditionType": "example.com/lb"}])
    pod["status"] = {"conditions": [{"type": "example.com/lb", "status": "True"}]}
    status = build_pod_status(pod, _view(_running()), None, T0)
    assert _conditions(status)["Ready"]["status"] == "True"


def test_initialized_is_false_while_an_init_container_is_incomplete() -> None:
    waiting = ContainerView("app", "img", Waiting("PodInitializing"))
    status = build_pod_status(_pod(), _view(waiting, init=(_running("setup"),)), None, T0)
    initialized = _conditions(status)["Initialized"]
    assert (initialized["status"], initialized["message"]) == (
        "False",
        "containers with incomplete status: [setup]",
    )


def test_init_container_statuses_are_reported_only_for_pods_with_init_containers() -> None:
    assert "initContainerStatuses" not in build_pod_status(_pod(), _view(_running()), None, T0)


SYSTEM = NodeSystem("mid", "bid", "6.1.0", "Debian", "amd64")


def test_node_carries_the_process_node_labels() -> None:
    labels = build_node("process-node", SYSTEM, T1, T0)["metadata"]["labels"]
    assert labels["kubernetes.io/hostname"] == "process-node"
    assert labels["type"] == "process"
    assert labels["troupe.dev/process-node"] == "true"


def test_node_is_ready_with_heartbeat_now_and_transition_at_ready_since() -> None:
    conditions = {c["type"]: c for c in build_node("n", SYSTEM, T1, T0)["status"]["conditions"]}
    ready = conditions["Ready"]
    assert (ready["status"], ready["lastHeartbeatTime"], ready["lastTransitionTime"]) == (
        "True",
        "2026-01-02T03:04:35Z",
        "2026-01-02T03:04:05Z",
    )


def test_node_reports_fixed_capacity_and_loopback_address() -> None:
    status = build_node("n", SYSTEM, T0, T0)["status"]
    assert {k: status["allocatable"][k] for k in ("cpu", "memory", "pods")} == {
        "cpu": "16",
        "memory": "64Gi",
        "pods": "110",
    }
    assert status["addresses"] == [
        {"type": "InternalIP", "address": "127.0.0.1"},
        {"type": "Hostname", "address": "n"},
    ]


def test_node_advertises_its_kubelet_endpoint_port() -> None:
    status = build_node("n", SYSTEM, T0, T0, kubelet_port=10250)["status"]
    assert status["daemonEndpoints"] == {"kubeletEndpoint": {"Port": 10250}}


def test_node_reports_the_troupe_kubelet_version() -> None:
    info = build_node("n", SYSTEM, T0, T0)["status"]["nodeInfo"]
    assert info["kubeletVersion"] == "v1.36.3-troupe-process"


def test_lease_is_held_by_the_node_and_owned_by_it() -> None:
    lease = build_lease("n", "node-uid", T0)
    assert lease["spec"]["holderIdentity"] == "n"
    assert lease["spec"]["leaseDurationSeconds"] == 40
    assert lease["spec"]["renewTime"] == "2026-01-02T03:04:05.000000Z"
    assert lease["metadata"]["ownerReferences"][0]["uid"] == "node-uid"


def test_cleared_taints_drop_not_ready_and_unreachable_only() -> None:
    node = {
        "spec": {
            "taints": [
                {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"},
                {"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"},
                {"key": "dedicated", "value": "x", "effect": "NoSchedule"},
            ]
        }
    }
    assert cleared_taints(node) == [{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]


def test_cleared_taints_is_none_when_nothing_needs_lifting() -> None:
    assert cleared_taints({"spec": {"taints": [{"key": "dedicated"}]}}) is None
