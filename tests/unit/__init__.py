"""Unit tests: pure code, no cluster and no NATS (`make test-unit`)."""
