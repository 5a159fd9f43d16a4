"""The CRD's patterns and the models agree: whatever the CRD's grammar allows, the models
accept, and what it refuses, they refuse, so nothing the API server stores can crash the
operator's parse. Values are generated from the very patterns the CRD carries."""

from __future__ import annotations

import decimal
import re
from datetime import timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kubernetes.utils.quantity import parse_quantity
from pydantic import ValidationError

from troupe_operator.api.agent import AgentRuntime, AgentSpec, EnvVar, Toleration
from troupe_operator.api.workflow import Trigger
from troupe_runtime.contract import grammar, naming
from troupe_runtime.contract.durations import (
    DURATION_MAX_LENGTH,
    DURATION_PATTERN,
    MAX_DURATION,
    MAX_NANOSECONDS,
    format_duration,
    nanoseconds,
    parse_delay,
    parse_duration,
)
from troupe_runtime.contract.policies import Contract, Handler, fits_ack_wait


def _from(pattern: str, max_size: int) -> st.SearchStrategy[str]:
    """Strings the CRD accepts for ``pattern`` with ``maxLength`` ``max_size``."""
    return st.from_regex(re.compile(pattern), fullmatch=True).filter(lambda s: len(s) <= max_size)


def _accepts(model: type[Any], data: dict[str, Any]) -> bool:
    try:
        model.model_validate(data)
    except ValidationError:
        return False
    return True


FAST = settings(max_examples=40)
"""Enough to cover each pattern's branches while the unit lane stays fast."""
ASCII = st.text(st.characters(min_codepoint=0, max_codepoint=0x7F), max_size=40)
ANY_TEXT = st.one_of(ASCII, st.text(max_size=20))


# Durations.


@FAST
@given(_from(DURATION_PATTERN, DURATION_MAX_LENGTH))
def test_a_crd_valid_duration_parses_to_its_exact_value(text: str) -> None:
    total = nanoseconds(text)

    if 0 < total <= MAX_NANOSECONDS:
        value = parse_duration(text)
        assert value == timedelta(microseconds=total // 1000)
        assert parse_duration(format_duration(value)) == value
    else:
        with pytest.raises(ValueError, match="duration"):
            parse_duration(text)
    assert (total <= MAX_NANOSECONDS) == _parses(parse_delay, text)


def _parses(parse: Any, text: str) -> bool:
    try:
        parse(text)
    except ValueError:
        return False
    return True


@FAST
@given(ANY_TEXT)
def test_text_outside_the_duration_pattern_is_refused(text: str) -> None:
    assert _parses(parse_delay, text) == (
        re.fullmatch(DURATION_PATTERN, text) is not None
        and len(text) <= DURATION_MAX_LENGTH
        and nanoseconds(text) <= MAX_NANOSECONDS
    )


def test_the_largest_duration_nats_holds_is_accepted_and_one_millisecond_more_is_not() -> None:
    assert parse_duration("2562047h47m16.854s") == MAX_DURATION
    with pytest.raises(ValueError, match="at most"):
        parse_duration("2562047h47m16.855s")
    with pytest.raises(ValueError, match="greater than 0"):
        parse_duration("0s")
    assert parse_delay("0s") == timedelta()


def test_zero_durations_are_refused_where_zero_makes_no_sense() -> None:
    for data in (
        {"role": "r", "timeout": "0s"},
        {"role": "r", "messaging": {"ackWait": "0ms"}},
        {"role": "r", "deadLetter": {"retention": "0h"}},
    ):
        assert not _accepts(AgentSpec, data), data
    assert _accepts(AgentSpec, {"role": "r", "retry": {"backoff": ["0s", "1s"]}})


# The timeout fits into ackWait.


@FAST
@given(st.integers(1, 10**7), st.integers(1, 10**7))
def test_timeout_fits_exactly_when_timeout_plus_ten_seconds_is_within_seventy_percent(
    timeout_ms: int, ack_wait_ms: int
) -> None:
    timeout, ack_wait = timedelta(milliseconds=timeout_ms), timedelta(milliseconds=ack_wait_ms)
    spec = {
        "role": "r",
        "timeout": format_duration(timeout),
        "messaging": {"ackWait": format_duration(ack_wait)},
    }

    expected = (timeout_ms + 10_000) * 10 <= ack_wait_ms * 7
    assert fits_ack_wait(timeout, ack_wait) == expected
    assert _accepts(AgentSpec, spec) == expected


def test_the_defaults_fit() -> None:
    assert _accepts(AgentSpec, {"role": "r"})


# Subjects.


@FAST
@given(_from(grammar.OUTPUT_SUBJECT_PATTERN, grammar.SUBJECT_MAX))
def test_a_crd_valid_output_subject_is_accepted_and_publishable(subject: str) -> None:
    assert _accepts(Contract, {"outputSubjects": [subject]})
    assert naming.is_literal_subject(subject)
    assert not subject.startswith(naming.RESERVED_SUBJECT_PREFIX)


@FAST
@given(ASCII)
def test_an_output_subject_is_accepted_exactly_when_it_is_literal_and_not_the_servers(
    subject: str,
) -> None:
    expected = (
        naming.is_literal_subject(subject)
        and not subject.startswith("$")
        and len(subject) <= grammar.SUBJECT_MAX
    )
    assert _accepts(Contract, {"outputSubjects": [subject]}) == expected


@pytest.mark.parametrize(
    "subject", ["a.*", "a.>", "a b", "a..b", ".a", "a.", "$JS.API.STREAM.LIST", "", "a\tb"]
)
def test_wildcard_blank_empty_token_and_server_output_subjects_are_refused(subject: str) -> None:
    assert not _accepts(Contract, {"outputSubjects": [subject]})


@FAST
@given(_from(grammar.TRIGGER_SUBJECT_PATTERN, grammar.SUBJECT_MAX))
def test_a_crd_valid_trigger_subject_is_accepted_unless_it_is_troupes(subject: str) -> None:
    assert _accepts(Trigger, {"subject": subject}) == (not grammar.is_troupe_subject(subject))
    tokens = subject.split(".")
    assert tokens[0] not in ("*", ">")
    assert ">" not in tokens[:-1]


@pytest.mark.parametrize(
    "subject", ["troupe", "troupe.ns.agents.a.in.p0", "$JS.API.>", ">", "*.orders", "a.>.b"]
)
def test_trigger_subjects_under_troupe_the_server_or_a_leading_wildcard_are_refused(
    subject: str,
) -> None:
    assert not _accepts(Trigger, {"subject": subject})


@FAST
@given(_from(grammar.DNS_LABEL_PATTERN, grammar.DNS_LABEL_MAX), ASCII)
def test_the_own_inbox_pattern_matches_exactly_the_agents_inbox_subjects(
    agent: str, namespace: str
) -> None:
    namespace = namespace.replace(".", "") or "ns"
    own = re.compile(grammar.own_inbox_pattern(agent))
    assert own.fullmatch(naming.inbox_subject(namespace, agent, 3))
    assert not own.fullmatch(naming.dead_letter_subject(namespace, agent))
    assert own.fullmatch(f"troupe.{namespace}.agents.{agent}.in.p0")
    assert own.fullmatch(f"troupe.{namespace}.agents.{agent}.in")
    assert not own.fullmatch(f"troupe.{namespace}.agents.{agent}x.in.p0")
    assert not own.fullmatch(f"troupe.{namespace}.agents.{agent}.dlq")


# Names, env, containers, resources, tolerations, images, URLs.


@FAST
@given(_from(grammar.ENV_NAME_PATTERN, grammar.ENV_NAME_MAX))
def test_an_env_name_is_accepted_exactly_when_it_is_not_reserved(name: str) -> None:
    assert _accepts(EnvVar, {"name": name}) == (not grammar.is_reserved_env(name))


@pytest.mark.parametrize("name", ["A=B", "", "TROUPE_CONFIG_JSON", "POD_IP", "POD_NAME", "é"])
def test_bad_or_reserved_env_names_are_refused(name: str) -> None:
    assert not _accepts(EnvVar, {"name": name})


def test_pythonpath_is_the_specs_unless_the_operator_sets_it_for_code() -> None:
    env = [{"name": "PYTHONPATH", "value": "/app"}]
    assert _accepts(AgentRuntime, {"env": env})
    assert not _accepts(AgentRuntime, {"env": env, "code": {"configMap": "c"}})


def test_duplicate_env_names_and_value_beside_value_from_are_refused() -> None:
    assert not _accepts(AgentRuntime, {"env": [{"name": "A"}, {"name": "A", "value": "x"}]})
    assert not _accepts(EnvVar, {"name": "A", "value": "x", "valueFrom": {"fieldRef": {}}})


@FAST
@given(_from(grammar.DNS_LABEL_PATTERN, grammar.DNS_LABEL_MAX))
def test_a_sidecar_named_by_a_dns_label_is_accepted_unless_it_is_the_runtime(name: str) -> None:
    sidecar = {"name": name, "image": "busybox", "command": ["sleep", "1"]}
    assert _accepts(AgentRuntime, {"sidecars": [sidecar]}) == (name != grammar.RUNTIME_CONTAINER)


@pytest.mark.parametrize(
    "sidecars",
    [
        [{"image": "x"}],
        [{"name": "Side", "image": "x"}],
        [{"name": "a", "image": "x"}, {"name": "a", "image": "y"}],
        [{"name": "runtime", "image": "x"}],
        [{"name": "a", "image": "bad image"}],
    ],
)
def test_nameless_misnamed_duplicate_runtime_or_blank_image_sidecars_are_refused(
    sidecars: list[dict[str, Any]],
) -> None:
    assert not _accepts(AgentRuntime, {"sidecars": sidecars})


@FAST
@given(_from(grammar.QUANTITY_PATTERN, grammar.QUANTITY_MAX))
def test_a_crd_valid_quantity_is_accepted_and_is_a_kubernetes_quantity(quantity: str) -> None:
    assert _accepts(AgentRuntime, {"resources": {"limits": {"cpu": quantity}}})
    parse_quantity(quantity)  # type: ignore[no-untyped-call]


@pytest.mark.parametrize("quantity", ["-1", "1 Gi", "1GB", "", "one", -3])
def test_invalid_or_negative_quantities_are_refused(quantity: Any) -> None:
    assert not _accepts(AgentRuntime, {"resources": {"requests": {"memory": quantity}}})


@FAST
@given(_from(grammar.RESOURCE_NAME_PATTERN, grammar.RESOURCE_NAME_MAX))
def test_a_crd_valid_resource_name_is_accepted_unless_kubernetes_reserves_it(name: str) -> None:
    expected = grammar.NATIVE_DOMAIN not in name and not name.startswith(grammar.QUOTA_PREFIX)
    assert _accepts(AgentRuntime, {"resources": {"limits": {name: "1"}}}) == expected


@pytest.mark.parametrize("name", ["gpu", "CPU", "kubernetes.io/gpu", "example.com/", "a b/c"])
def test_unknown_resource_names_are_refused(name: str) -> None:
    assert not _accepts(AgentRuntime, {"resources": {"limits": {name: "1"}}})


@FAST
@given(
    st.one_of(st.none(), _from(grammar.QUALIFIED_NAME_PATTERN, grammar.QUALIFIED_NAME_MAX)),
    st.sampled_from(["Exists", "Equal"]),
    st.one_of(st.none(), _from(grammar.LABEL_VALUE_PATTERN, grammar.LABEL_VALUE_MAX)),
    st.sampled_from([None, "NoSchedule", "NoExecute"]),
    st.one_of(st.none(), st.integers(0, 3600)),
)
def test_a_toleration_is_accepted_exactly_when_the_pod_would_be(
    key: str | None, operator: str, value: str | None, effect: str | None, seconds: int | None
) -> None:
    data: dict[str, Any] = {"key": key, "operator": operator, "value": value, "effect": effect}
    data["tolerationSeconds"] = seconds
    expected = (
        not (operator == "Exists" and value)
        and (key is not None or operator == "Exists")
        and (seconds is None or effect == "NoExecute")
    )
    assert _accepts(Toleration, {k: v for k, v in data.items() if v is not None}) == expected


@FAST
@given(_from(grammar.IMAGE_PATTERN, grammar.IMAGE_MAX))
def test_an_image_without_whitespace_is_accepted(image: str) -> None:
    assert _accepts(AgentRuntime, {"image": image})


@pytest.mark.parametrize("image", ["busy box", " busybox", "busybox\n", ""])
def test_an_image_with_whitespace_is_refused(image: str) -> None:
    assert not _accepts(AgentRuntime, {"image": image})


@pytest.mark.parametrize(
    ("url", "accepted"),
    [
        ("http://localhost:8080/handle", True),
        ("https://example.com/x?y=1", True),
        ("ftp://example.com/x", False),
        ("file:///etc/passwd", False),
        ("http://exa mple.com", False),
        ("localhost:8080", False),
    ],
)
def test_http_handler_urls_are_http_or_https(url: str, accepted: bool) -> None:
    assert _accepts(Handler, {"type": "http", "url": url}) == accepted


def test_handlers_need_what_their_type_uses() -> None:
    # An llm handler needs a Secret (one call) or spec.llm (the agent loop): the spec decides.
    llm = {"role": "r", "runtime": {"handler": {"type": "llm"}}}
    assert not _accepts(AgentSpec, llm)
    loop = {"model": {"provider": "local", "model": "m"}}
    assert _accepts(AgentSpec, {**llm, "llm": loop})
    secret = {"handler": {"type": "llm", "secretName": "openai"}}
    assert not _accepts(AgentSpec, {"role": "r", "runtime": secret, "llm": loop})
    assert not _accepts(AgentRuntime, {"handler": {"type": "http"}})
    assert not _accepts(AgentRuntime, {"handler": {"type": "python"}})
    assert _accepts(AgentRuntime, {"handler": {"type": "llm", "secretName": "openai"}})


def test_duplicate_error_states_are_refused() -> None:
    assert not _accepts(Contract, {"errorStates": [{"name": "TooLong"}, {"name": "TooLong"}]})


# Requests and limits, node selectors, env sources.


@pytest.mark.parametrize(
    ("resources", "accepted"),
    [
        ({"requests": {"cpu": "500m"}, "limits": {"cpu": "1"}}, True),
        ({"requests": {"cpu": "1.5"}, "limits": {"cpu": "1500m"}}, True),
        ({"requests": {"memory": "2Gi"}, "limits": {"memory": "1Gi"}}, False),
        ({"requests": {"cpu": 2}, "limits": {"cpu": "1999m"}}, False),
        ({"requests": {"example.com/gpu": 1}, "limits": {"example.com/gpu": "1"}}, True),
        ({"requests": {"example.com/gpu": 1}}, False),
        ({"requests": {"example.com/gpu": 1}, "limits": {"example.com/gpu": 2}}, False),
        ({"limits": {"example.com/gpu": "500m"}}, False),
        ({"limits": {"example.com/gpu": "2e0"}}, True),
    ],
)
def test_requests_fit_their_limits_and_extended_resources_are_whole_and_not_overcommitted(
    resources: dict[str, Any], accepted: bool
) -> None:
    assert _accepts(AgentRuntime, {"resources": resources}) == accepted


@FAST
@given(_from(grammar.QUANTITY_PATTERN, grammar.QUANTITY_MAX))
def test_quantities_are_valued_as_kubernetes_values_them(quantity: str) -> None:
    with decimal.localcontext() as context:
        context.prec = 400  # exact: the client computes in the current decimal context
        expected = parse_quantity(quantity)  # type: ignore[no-untyped-call]
    assert grammar.quantity_value(quantity) == expected


@FAST
@given(
    _from(grammar.QUALIFIED_NAME_PATTERN, grammar.QUALIFIED_NAME_MAX),
    _from(grammar.LABEL_VALUE_PATTERN, grammar.LABEL_VALUE_MAX),
)
def test_a_crd_valid_node_selector_is_accepted(key: str, value: str) -> None:
    assert _accepts(AgentRuntime, {"nodeSelector": {key: value}})


@pytest.mark.parametrize("selector", [{"bad key": "x"}, {"k": "bad value"}, {"-k": "v"}])
def test_invalid_node_selectors_are_refused(selector: dict[str, str]) -> None:
    assert not _accepts(AgentRuntime, {"nodeSelector": selector})


@pytest.mark.parametrize(
    ("source", "accepted"),
    [
        ({"configMapRef": {"name": "settings"}}, True),
        ({"secretRef": {"name": "keys.v1", "optional": True}, "prefix": "KEYS_"}, True),
        ({}, False),
        ({"configMapRef": {"name": "a"}, "secretRef": {"name": "b"}}, False),
        ({"secretRef": {}}, False),
        ({"secretRef": {"name": "Keys"}}, False),
        ({"secretRef": {"name": "k"}, "prefix": "A="}, False),
        ({"secretRef": {"name": "k"}, "extra": 1}, False),
    ],
)
def test_an_env_from_entry_names_one_valid_source(source: dict[str, Any], accepted: bool) -> None:
    assert _accepts(AgentRuntime, {"envFrom": [source]}) == accepted


@pytest.mark.parametrize(
    ("source", "accepted"),
    [
        ({"secretKeyRef": {"name": "keys", "key": "api.key"}}, True),
        ({"fieldRef": {"fieldPath": "metadata.namespace"}}, True),
        ({"resourceFieldRef": {"resource": "limits.memory", "divisor": "1Mi"}}, True),
        ({"secretKeyRef": {"name": "keys"}}, False),
        ({"secretKeyRef": {"name": "k", "key": "a"}, "fieldRef": {"fieldPath": "x"}}, False),
        ({}, False),
        ({"resourceFieldRef": {"resource": "limits.cpu", "divisor": "-1"}}, False),
    ],
)
def test_value_from_names_one_complete_source(source: dict[str, Any], accepted: bool) -> None:
    assert _accepts(EnvVar, {"name": "A", "valueFrom": source}) == accepted
