"""The operator's only I/O: the Kubernetes API and NATS JetStream, each behind one client."""
