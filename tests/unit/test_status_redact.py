"""URLs in status, Events and logs lose their userinfo and query values."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from troupe_runtime.contract.redact import redact


def test_a_nats_password_is_hidden_and_the_host_kept() -> None:
    assert redact("NATS at nats://bob:hunter2@nats:4222: no servers") == (
        "NATS at nats://***@nats:4222: no servers"
    )


def test_a_token_as_user_is_hidden() -> None:
    assert redact("nats://s3cr3t@nats:4222") == "nats://***@nats:4222"


def test_the_query_is_hidden_and_the_path_kept() -> None:
    assert redact("see https://h/p?token=abc&page=2#top now") == "see https://h/p?*** now"


def test_text_without_urls_is_unchanged() -> None:
    assert redact("3/3 replicas ready: user@example") == "3/3 replicas ready: user@example"


def test_a_server_list_hides_every_password() -> None:
    assert "p2" not in redact("nats://a:p1@h1:4222,nats://b:p2@h2:4222 down")
    assert "p1" not in redact("nats://a:p1@h1:4222,nats://b:p2@h2:4222 down")


# Secrets carry a marker no other generated part contains, so "does not survive" is exact.
SECRET = st.text(
    alphabet=st.characters(
        blacklist_categories=("Cs", "Zs", "Zl", "Zp", "Cc"),
        blacklist_characters="/\"'<>",
    ),
    min_size=1,
    max_size=20,
).map(lambda text: f"Q{text}Q")
PLAIN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-.", min_size=1, max_size=12)
SCHEMES = st.sampled_from(["nats", "tls", "ws", "wss", "http", "https"])


@given(SCHEMES, PLAIN, SECRET, PLAIN, st.text(alphabet="abc :;,", max_size=10))
def test_no_password_survives(scheme: str, user: str, secret: str, host: str, around: str) -> None:
    text = f"{around}{scheme}://{user}:{secret}@{host}:4222/x{around}"

    assert "Q" not in redact(text)


@given(SCHEMES, SECRET, PLAIN)
def test_no_token_survives(scheme: str, secret: str, host: str) -> None:
    assert "Q" not in redact(f"{scheme}://{secret}@{host}")
    assert "Q" not in redact(f"{scheme}://{host}/p?k={secret}")
    assert "Q" not in redact(f"{scheme}://{host}/p?a=b&{secret}")


@given(st.text(max_size=60))
def test_redacting_twice_changes_nothing_more(text: str) -> None:
    assert redact(redact(text)) == redact(text)
