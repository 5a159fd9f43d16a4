"""Troupe's test suites: unit (no cluster), integration (real API server and NATS), e2e."""
