"""Follows the pods bound to the node and gives each its own worker.

List, then watch from the list's resourceVersion; on 410 Gone, a dropped
stream or any error, list again. A pod missing from a fresh list is gone (its
DELETED event was missed), so its worker is told to stop. Nothing here may
end the thread: every failure is logged and the loop starts over.
"""

from __future__ import annotations

import logging
import threading

from troupe_devcluster.processnode.kube import EXPECTED_ERRORS, JSON, ApiError
from troupe_devcluster.processnode.runtime import LogSource, NodeContext, PodWorker

log = logging.getLogger(__name__)

WATCH_TIMEOUT_SECONDS = 300
RELIST_DELAY_SECONDS = 1.0
# Bounds how long a stuck worker can hold up the node's exit, past its grace.
JOIN_SLACK_SECONDS = 10.0


class PodManager:
    """Owns the pod workers: one per pod uid, started on first sight."""

    def __init__(self, node: NodeContext) -> None:
        self._node = node
        self._lock = threading.Lock()
        self._workers: dict[str, PodWorker] = {}
        # Uids whose worker has finished; later events for them are stale.
        self._finished: set[str] = set()
        self._stopping = False
        self._query = {"fieldSelector": f"spec.nodeName={node.node_name}"}

    def run(self, stop: threading.Event) -> None:
        """List and watch until ``stop`` is set; errors only cause a re-list."""
        while not stop.is_set():
            try:
                self._watch(self._relist(), stop)
            except Exception as error:
                trace = not isinstance(error, EXPECTED_ERRORS)
                log.warning("pod watch failed, listing again: %s", error, exc_info=trace)
                stop.wait(RELIST_DELAY_SECONDS)

    def _relist(self) -> str:
        listing = self._node.kube.get("/api/v1/pods", self._query)
        seen = set()
        for pod in listing.get("items") or []:
            seen.add(pod["metadata"]["uid"])
            self._apply(pod)
        with self._lock:
            missing = [worker for uid, worker in self._workers.items() if uid not in seen]
            self._finished &= seen
        for worker in missing:
            worker.forget()
        return str(listing["metadata"]["resourceVersion"])

    def _watch(self, resource_version: str, stop: threading.Event) -> None:
        while not stop.is_set():
            query = {
                **self._query,
                "resourceVersion": resource_version,
                "allowWatchBookmarks": "true",
            }
            for event in self._node.kube.watch("/api/v1/pods", query, WATCH_TIMEOUT_SECONDS):
                kind, pod = event["type"], event["object"]
                if kind == "ERROR":
                    if pod.get("code") == 410:
                        log.info("pod watch expired; listing again")
                        return
                    raise ApiError(int(pod.get("code", 500)), str(pod.get("message")))
                resource_version = pod["metadata"]["resourceVersion"]
                if kind in ("ADDED", "MODIFIED"):
                    self._apply(pod)
                elif kind == "DELETED":
                    self._forget(pod["metadata"]["uid"])
                if stop.is_set():
                    return

    def _apply(self, pod: JSON) -> None:
        uid = pod["metadata"]["uid"]
        with self._lock:
            if self._stopping or uid in self._finished:
                return
            worker = self._workers.get(uid)
            if worker is None:
                worker = PodWorker(pod, self._node, self._worker_done)
                self._workers[uid] = worker
                log.info("%s: new pod", worker.label)
                worker.start()
                return
        worker.update(pod)

    def container_log(self, namespace: str, name: str, container: str, previous: bool) -> LogSource:
        """The log the kubelet endpoint serves; LookupError for a pod the node does not run."""
        label = f"{namespace}/{name}"
        with self._lock:
            # The newest worker of that name: an older one may still be stopping.
            worker = next((w for w in reversed(self._workers.values()) if w.label == label), None)
        if worker is None:
            raise LookupError(f'pod "{label}" does not exist')
        return worker.log_source(container, previous)

    def _forget(self, uid: str) -> None:
        with self._lock:
            worker = self._workers.get(uid)
        if worker is not None:
            worker.forget()

    def _worker_done(self, uid: str) -> None:
        with self._lock:
            self._workers.pop(uid, None)
            self._finished.add(uid)

    def shutdown(self, grace: float) -> None:
        """Stop every pod's processes (SIGTERM, SIGKILL after ``grace``) and wait for it."""
        with self._lock:
            self._stopping = True
            workers = list(self._workers.values())
        for worker in workers:
            worker.shutdown(grace)
        for worker in workers:
            worker.join(grace + JOIN_SLACK_SECONDS)
