"""Where a callee answers an LLM agent's tool call: its own reply subjects, on the event log."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from troupe_runtime.agent.outputs import reply_refusal
from troupe_runtime.contract import naming
from troupe_runtime.contract.agent_config import RuntimeConfig

CONFIG = RuntimeConfig.model_validate(
    {"agent": "analyst", "namespace": "shop", "contract": {"outputSubjects": ["out.shop.done"]}}
)
LABEL = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?\Z")


@given(caller=LABEL, request_id=st.text(min_size=1, max_size=80))
def test_a_callee_may_reply_to_any_agent_call_of_its_namespace(
    caller: str, request_id: str
) -> None:
    subject = naming.agent_call_reply_subject("shop", caller, request_id)
    assert naming.is_agent_call_reply_subject("shop", subject)
    assert subject.startswith(naming.event_log_subject("shop", naming.AGENT_CALL_LOG_PREFIX))
    assert reply_refusal(CONFIG, subject) is None


@given(agent=LABEL, event_id=st.text(min_size=1, max_size=80))
def test_no_conversation_journal_is_a_reply_subject(agent: str, event_id: str) -> None:
    journal = naming.event_log_subject("shop", naming.conversation_log_id(agent, event_id))
    assert not naming.is_agent_call_reply_subject("shop", journal)
    assert reply_refusal(CONFIG, journal) is not None


@given(caller=LABEL, request_id=st.text(min_size=1, max_size=80))
def test_another_namespaces_agent_calls_are_refused(caller: str, request_id: str) -> None:
    subject = naming.agent_call_reply_subject("other", caller, request_id)
    reason = reply_refusal(CONFIG, subject)
    assert reason is not None
    assert repr(subject) in reason


def test_a_reply_subject_is_one_literal_token_under_the_log_root() -> None:
    for subject in (
        "troupe.shop.logs.call-a-1.deeper",
        "troupe.shop.logs.call-*",
        "troupe.shop.logs.call->",
    ):
        assert not naming.is_agent_call_reply_subject("shop", subject)
