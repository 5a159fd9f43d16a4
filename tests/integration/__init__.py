"""Integration tests against a real kube-apiserver, the process node and nats-server."""
