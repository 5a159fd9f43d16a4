"""The layout's rules that import-linter cannot see: NATS names are spelled only in the
contract, and the one version reaches every place that states it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

import troupe_operator
import troupe_runtime
from troupe_operator.gen import version as version_gen
from troupe_runtime.contract import naming

REPOSITORY = Path(__file__).resolve().parents[2]
PRODUCT = [
    REPOSITORY / "agent-runtime" / "src" / "troupe_runtime",
    REPOSITORY / "agent-runtime" / "src" / "troupe_cli",
    REPOSITORY / "operator" / "src" / "troupe_operator",
]
CONTRACT = PRODUCT[0] / "contract"
# A literal that builds a stream, KV stream, JetStream API subject or message subject.
HAND_BUILT_NAME = re.compile(
    r"""(?x)
    f?["'](
        KV_                              # JetStream's KV stream prefix
      | \$JS\.                           # the JetStream API
      | TROUPE_(?:[A-Z]+_)*\{            # an inbox, DLQ, advisory, event or workflow stream
      | troupe_\{                        # a KV bucket
    )
    |  f["']troupe\.\{                   # a subject under the root
    """
)

DNS_LABEL = st.from_regex(r"\A[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?\Z")


def product_modules_outside_the_contract() -> list[Path]:
    return [
        path
        for package in PRODUCT
        for path in sorted(package.rglob("*.py"))
        if CONTRACT not in path.parents
    ]


def test_the_product_modules_are_found() -> None:
    modules = product_modules_outside_the_contract()
    assert len(modules) > 40
    assert PRODUCT[0] / "agent" / "worker.py" in modules


@pytest.mark.parametrize("path", product_modules_outside_the_contract(), ids=lambda path: path.name)
def test_no_module_outside_the_contract_spells_a_nats_name(path: Path) -> None:
    found = [
        f"{path.relative_to(REPOSITORY)}:{number}: {line.strip()}"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if HAND_BUILT_NAME.search(line)
    ]
    assert not found, "use troupe_runtime.contract.naming:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "line",
    [
        'stream = f"KV_{config.bucket}"',
        'subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer}"',
        'name = f"TROUPE_DLQ_{namespace}_{agent}"',
        'subject = f"troupe.{namespace}.agents.{agent}.in.p0"',
    ],
)
def test_the_name_check_catches_hand_built_names(line: str) -> None:
    assert HAND_BUILT_NAME.search(line)


def test_the_name_check_spares_env_vars_and_event_types() -> None:
    for line in ('CONFIG_JSON_ENV = "TROUPE_CONFIG_JSON"', 'ERROR_TYPE = "troupe.error"'):
        assert not HAND_BUILT_NAME.search(line)


def test_every_package_reports_the_version_file() -> None:
    version = (REPOSITORY / "VERSION").read_text().strip()
    assert troupe_runtime.__version__ == version
    assert troupe_operator.__version__ == version


def test_the_chart_carries_the_version_file() -> None:
    chart = yaml.safe_load((REPOSITORY / "charts" / "troupe" / "Chart.yaml").read_text())
    version = (REPOSITORY / "VERSION").read_text().strip()
    assert (chart["version"], chart["appVersion"]) == (version, version)


def test_the_version_generator_keeps_the_charts_comments() -> None:
    text = "# the chart's version\nversion: 0.0.1\n# the images'\nappVersion: \"0.0.1\"\n"
    assert version_gen.render(text, "1.2.3") == (
        "# the chart's version\nversion: 1.2.3\n# the images'\nappVersion: \"1.2.3\"\n"
    )


def test_the_version_generator_refuses_a_chart_without_the_fields() -> None:
    with pytest.raises(ValueError, match="appVersion"):
        version_gen.render("version: 0.0.1\n", "1.2.3")


@given(st.from_regex(r"\A[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}(-[a-z0-9.]{1,10})?\Z"))
def test_the_version_generator_writes_what_yaml_reads_back(version: str) -> None:
    chart = yaml.safe_load(version_gen.render('version: 0.1.0\nappVersion: "0.1.0"\n', version))
    assert (str(chart["version"]), chart["appVersion"]) == (version, version)


@given(namespace=DNS_LABEL, agent=DNS_LABEL, priority=st.integers(0, 9))
def test_names_are_valid_jetstream_names_and_subjects(
    namespace: str, agent: str, priority: int
) -> None:
    streams = [
        naming.inbox_stream(namespace, agent),
        naming.dead_letter_stream(namespace, agent),
        naming.advisory_stream(namespace, agent),
        naming.kv_stream(naming.kv_bucket(namespace, "notes")),
        naming.event_log_stream(namespace),
        naming.workflow_stream(namespace, agent),
    ]
    for stream in streams:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", stream), stream
    subject = naming.inbox_subject(namespace, agent, priority)
    assert all(subject.split(".")), subject
    assert subject.startswith(naming.inbox_wildcard(namespace, agent).removesuffix(">"))
