"""A real, local Kubernetes control plane plus NATS JetStream for tests and the demo.

kind needs a container engine; this package runs the same control-plane
binaries (built from Go modules) as plain processes instead, adds kwok fake
nodes and a process node that runs pods as local processes.
"""
