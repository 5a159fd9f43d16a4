"""The gateway directory's pure planning, behaviour by behaviour: what an Agent and a
Workflow are listed as, and when the stored value must be rewritten (only when it differs,
whatever junk is stored)."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from nats.js.api import StorageType

from troupe_operator.api import AgentSpec, WorkflowSpec
from troupe_operator.api.agent import NatsConnection
from troupe_operator.api.status import Condition
from troupe_operator.builders import directory
from troupe_operator.builders.directory import Listing
from troupe_runtime.contract import naming
from troupe_runtime.contract.gateway import DirectoryEntry

NAMESPACE = "team"
LLM = {"model": {"provider": "openai", "model": "small"}}


def agent_spec(**fields: Any) -> AgentSpec:
    return AgentSpec.model_validate({"role": "Summarise documents", **fields})


def llm_spec(**llm: Any) -> AgentSpec:
    return agent_spec(runtime={"handler": {"type": "llm"}}, llm={**LLM, **llm})


def workflow_spec(**fields: Any) -> WorkflowSpec:
    return WorkflowSpec.model_validate(
        {
            "trigger": {"subject": "orders.created"},
            "steps": [{"name": "one", "agentRef": "writer"}],
            **fields,
        }
    )


def listing(entry: DirectoryEntry | None, name: str = "writer") -> Listing:
    return Listing("Agent", NAMESPACE, name, entry)


def test_an_agent_is_listed_with_its_inbox_at_priority_zero_and_its_contract() -> None:
    schema = {"type": "object", "required": ["text"]}
    spec = agent_spec(contract={"inputSchema": schema, "outputSchema": {"type": "string"}})

    entry = directory.agent_entry(NAMESPACE, "writer", spec, 3)

    assert entry.kind == "Agent"
    assert (entry.namespace, entry.name, entry.generation) == (NAMESPACE, "writer", 3)
    assert entry.subject == naming.inbox_subject(NAMESPACE, "writer", 0)
    assert entry.input_schema == schema
    assert entry.output_schema == {"type": "string"}
    assert entry.description == "Summarise documents"
    assert not entry.streaming
    assert not entry.ready


def test_an_agents_description_is_its_role_then_a_blank_line_and_its_description() -> None:
    spec = agent_spec(description="Long documents are cut at 10k words.")

    entry = directory.agent_entry(NAMESPACE, "writer", spec, 1)

    assert entry.description == "Summarise documents\n\nLong documents are cut at 10k words."


def test_an_llm_agent_streams_unless_its_stream_is_off() -> None:
    assert directory.agent_entry(NAMESPACE, "a", llm_spec(), 1).streaming
    assert not directory.agent_entry(NAMESPACE, "a", llm_spec(stream=False), 1).streaming


def test_a_workflow_is_listed_with_its_start_subject_and_no_input_schema() -> None:
    entry = directory.workflow_entry(NAMESPACE, "orders", workflow_spec(description="Ships"), 2)

    assert entry.kind == "Workflow"
    assert entry.subject == naming.workflow_subject(NAMESPACE, "orders", "start", "*")
    assert entry.description == "Ships"
    assert entry.input_schema is None
    assert entry.generation == 2


def test_only_objects_on_the_operators_nats_are_listed() -> None:
    url = "nats://nats.troupe:4222"

    assert directory.listed(NatsConnection(), url)
    assert directory.listed(NatsConnection(url=url), url)
    assert not directory.listed(NatsConnection(url="nats://elsewhere:4222"), url)


def test_the_bucket_keeps_one_value_per_key_on_file() -> None:
    config = directory.bucket_config(NAMESPACE)

    assert config.bucket == naming.directory_bucket(NAMESPACE)
    assert config.history == 1
    assert config.storage == StorageType.FILE


def test_a_missing_entry_is_written_with_the_ready_condition() -> None:
    entry = directory.agent_entry(NAMESPACE, "writer", agent_spec(), 1)

    written = directory.to_write(listing(entry), None, ready=True)

    assert written is not None
    assert DirectoryEntry.model_validate_json(written) == entry.model_copy(update={"ready": True})


def test_an_entry_stored_as_wanted_is_not_written_again() -> None:
    entry = directory.agent_entry(NAMESPACE, "writer", agent_spec(), 1)
    stored = directory.encode(entry.model_copy(update={"ready": True}))

    assert directory.to_write(listing(entry), stored, ready=True) is None
    assert directory.to_write(listing(entry), stored, ready=False) is not None


def test_a_spec_with_problems_keeps_the_stored_entry_and_follows_ready() -> None:
    entry = directory.agent_entry(NAMESPACE, "writer", agent_spec(), 4)
    stored = directory.encode(entry.model_copy(update={"ready": True}))

    written = directory.to_write(listing(None), stored, ready=False)

    assert written is not None
    assert DirectoryEntry.model_validate_json(written) == entry
    assert directory.to_write(listing(None), None, ready=True) is None


def test_an_entry_of_another_object_under_the_key_is_junk() -> None:
    other = directory.agent_entry(NAMESPACE, "other", agent_spec(), 1)
    stored = directory.encode(other)

    assert directory.stored_entry(listing(None), stored) is None
    assert directory.to_write(listing(None), stored, ready=True) is None
    mine = directory.agent_entry(NAMESPACE, "writer", agent_spec(), 1)
    assert directory.to_write(listing(mine), stored, ready=False) == directory.encode(mine)


def test_ready_is_the_ready_condition() -> None:
    def condition(kind: str, status: str) -> Condition:
        return Condition.model_validate(
            {
                "type": kind,
                "status": status,
                "reason": "R",
                "lastTransitionTime": "2026-01-01T00:00:00Z",
            }
        )

    assert directory.is_ready([condition("Ready", "True")])
    assert not directory.is_ready([condition("Ready", "False")])
    assert not directory.is_ready([condition("MessagingReady", "True")])
    assert not directory.is_ready([])


json_leaves = st.none() | st.booleans() | st.integers() | st.text(max_size=8)
json_values = st.recursive(
    json_leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=12,
)
schemas = st.none() | st.dictionaries(
    st.sampled_from(["type", "const", "default", "x"]), json_values, max_size=3
)
agent_specs = st.builds(
    lambda role, description, input_schema, output_schema, llm: AgentSpec.model_validate(
        {
            "role": role,
            "description": description,
            "contract": {
                key: value
                for key, value in (("inputSchema", input_schema), ("outputSchema", output_schema))
                if value is not None
            },
            **(
                {"runtime": {"handler": {"type": "llm"}}, "llm": {**LLM, "stream": llm}}
                if llm is not None
                else {}
            ),
        }
    ),
    st.text(min_size=1, max_size=40).filter(str.strip),
    st.text(max_size=40),
    schemas,
    schemas,
    st.none() | st.booleans(),
)
stored_values = (
    st.none()
    | st.binary(max_size=64)
    | st.builds(lambda value: json.dumps(value).encode(), json_values)
)


@given(agent_specs, st.integers(min_value=1, max_value=2**40), st.booleans(), stored_values)
def test_one_write_converges_whatever_was_stored(
    spec: AgentSpec, generation: int, ready: bool, stored: bytes | None
) -> None:
    """From any stored value (none, junk, another entry), at most one write makes the key
    say exactly the spec with its readiness; after it, nothing is written again."""
    entry = directory.agent_entry(NAMESPACE, "writer", spec, generation)

    written = directory.to_write(listing(entry), stored, ready)
    now_stored = stored if written is None else written

    assert now_stored is not None
    assert DirectoryEntry.model_validate_json(now_stored) == entry.model_copy(
        update={"ready": ready}
    )
    assert directory.to_write(listing(entry), now_stored, ready) is None
    assert directory.to_write(listing(None), now_stored, ready) is None
    assert entry.input_schema == spec.contract.input_schema
    assert entry.description.startswith(spec.role)
