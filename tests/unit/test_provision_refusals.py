"""Which JetStream errors refuse a config (a person must act) and which mean "not now"."""

from __future__ import annotations

from nats.js.errors import APIError

from troupe_runtime.nats.provision import refuses_config


def test_overlapping_subjects_and_invalid_configs_are_refusals() -> None:
    assert refuses_config(APIError(code=400, err_code=10065, description="subjects overlap"))
    assert refuses_config(APIError(code=500, err_code=10052, description="invalid subject"))
    assert refuses_config(APIError(code=400, err_code=10025, description="invalid JSON"))
    assert refuses_config(APIError(code=500, err_code=10074, description="replicas > 1"))


def test_an_unavailable_jetstream_is_no_refusal() -> None:
    assert not refuses_config(APIError(code=503, description="no responders"))
    assert not refuses_config(APIError(code=503, err_code=10039, description="not enabled"))
    assert not refuses_config(APIError(code=503, err_code=10008, description="unavailable"))
    assert not refuses_config(APIError(code=500, err_code=10009, description="no leader"))
    assert not refuses_config(APIError(code=400, err_code=10005, description="no peers"))
    assert not refuses_config(APIError(code=500, description="no error code"))
