"""Handler loading, LLM settings, the health responder, JSON logs and NATS options."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from troupe_runtime.agent.handlers import load_handler
from troupe_runtime.agent.handlers.llm import LlmSettings, build_request
from troupe_runtime.contract.agent_config import NatsSettings
from troupe_runtime.contract.policies import Handler
from troupe_runtime.nats.connection import connect_options
from troupe_runtime.serving import logs
from troupe_runtime.serving.health import HealthServer
from troupe_runtime.serving.metrics import RuntimeMetrics


def test_handler_declarations_missing_their_fields_fail_at_start_up() -> None:
    with pytest.raises(ValueError, match=r"handler\.url is required"):
        load_handler(Handler(type="http"))
    with pytest.raises(ValueError, match=r"handler\.entrypoint"):
        load_handler(Handler(type="python"))
    with pytest.raises(ValueError, match="does not name a function"):
        load_handler(Handler(type="python", entrypoint="troupe_runtime:__version__"))
    with pytest.raises(ValueError, match="TROUPE_LLM_BASE_URL, TROUPE_LLM_API_KEY"):
        load_handler(Handler(type="llm", model="m"), env={})


def test_llm_settings_prefer_the_agents_model_over_the_secrets() -> None:
    env = {
        "TROUPE_LLM_BASE_URL": "http://llm/v1/",
        "TROUPE_LLM_API_KEY": "k",
        "TROUPE_LLM_MODEL": "from-secret",
    }
    assert LlmSettings.from_env(env, model="from-agent") == LlmSettings(
        base_url="http://llm/v1", api_key="k", model="from-agent"
    )
    assert LlmSettings.from_env(env).model == "from-secret"


def test_llm_requests_pass_chat_messages_through_and_wrap_anything_else() -> None:
    chat = {"messages": [{"role": "system", "content": "be brief"}], "temperature": 0}
    assert build_request(chat, "m") == {**chat, "model": "m"}
    assert build_request({"a": 1}, "m")["messages"] == [{"role": "user", "content": '{"a": 1}'}]


def test_the_health_responder_reports_liveness_readiness_and_metrics() -> None:
    metrics = RuntimeMetrics(CollectorRegistry())
    metrics.dead_lettered.labels("malformed").inc()
    ready = False
    server = HealthServer(metrics.registry, lambda: ready)

    assert server.respond("/healthz").startswith(b"HTTP/1.1 200 OK")
    assert server.respond("/readyz").startswith(b"HTTP/1.1 503")
    ready = True
    assert server.respond("/readyz").startswith(b"HTTP/1.1 200 OK")
    assert b'troupe_dead_lettered_total{reason="malformed"} 1.0' in server.respond("/metrics")
    assert server.respond("/nope").startswith(b"HTTP/1.1 404")


def test_log_lines_are_json_carrying_the_message_and_correlation_ids() -> None:
    record = logging.LogRecord("troupe", logging.INFO, __file__, 1, "handled %d", (3,), None)
    message, correlation = logs.message_id.set("e-1"), logs.correlation_id.set("run-1")
    try:
        line = json.loads(logs.JsonFormatter().format(record))
    finally:
        logs.message_id.reset(message)
        logs.correlation_id.reset(correlation)

    assert line["message"] == "handled 3"
    assert (line["messageId"], line["correlationId"]) == ("e-1", "run-1")


def test_nats_options_reconnect_forever_and_use_the_credentials_file() -> None:
    options = connect_options(
        NatsSettings(url="nats://nats:4222", credentials_file=Path("/creds/user.creds")), "agent"
    )

    assert options["max_reconnect_attempts"] == -1
    assert options["user_credentials"] == "/creds/user.creds"
    assert "tls" not in options
