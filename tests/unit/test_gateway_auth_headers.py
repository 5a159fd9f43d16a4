"""The gateway's credential headers are hostile input: whatever arrives, parsing yields one
well-formed credential or a 401 whose reason never quotes what was sent."""

from __future__ import annotations

import string

import pytest
from hypothesis import given
from hypothesis import strategies as st
from troupe_gateway.auth import (
    MAX_API_KEY_BYTES,
    MIN_API_KEY_BYTES,
    ApiKey,
    AuthUnavailable,
    BearerToken,
    Refused,
    jwt_seconds_left,
    key_entries,
    parse_credentials,
)

B64TOKEN = st.text(alphabet=string.ascii_letters + string.digits + "-._~+/", min_size=1).map(
    lambda t: t + "=="
) | st.text(alphabet=string.ascii_letters + string.digits + "-._~+/", min_size=1)
PRINTABLE = st.text(alphabet=[chr(c) for c in range(0x21, 0x7F)], min_size=1, max_size=1100)
HEADER_NAME = st.sampled_from(
    ["authorization", "Authorization", "AUTHORIZATION", "x-api-key", "X-API-Key", "x-other"]
)
HEADERS = st.dictionaries(HEADER_NAME, st.text(max_size=300), max_size=4)


@given(headers=HEADERS)
def test_any_headers_give_one_credential_or_a_401_that_quotes_nothing(
    headers: dict[str, str],
) -> None:
    refused: Refused | None = None
    credential: BearerToken | ApiKey | None = None
    try:
        credential = parse_credentials(headers)
    except Refused as caught:
        refused = caught
    if refused is not None:
        assert refused.status == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        for value in headers.values():
            if len(value.strip()) >= 4:
                assert value.strip() not in refused.reason
        return
    assert isinstance(credential, BearerToken | ApiKey)
    given_names = {name.lower() for name in headers} & {"authorization", "x-api-key"}
    assert len(given_names) == 1
    if isinstance(credential, BearerToken):
        assert credential.token
        assert credential.token.isascii()
        assert " " not in credential.token
    else:
        assert MIN_API_KEY_BYTES <= len(credential.key) <= MAX_API_KEY_BYTES


@given(token=B64TOKEN, scheme=st.sampled_from(["Bearer", "bearer", "BEARER"]), pad=st.text(" "))
def test_a_bearer_token_is_read_back_whatever_the_scheme_case(
    token: str, scheme: str, pad: str
) -> None:
    assert parse_credentials({"Authorization": f"{pad}{scheme} {token}{pad}"}) == BearerToken(token)


@given(key=PRINTABLE)
def test_an_api_key_is_taken_when_printable_and_of_a_fair_length(key: str) -> None:
    if MIN_API_KEY_BYTES <= len(key) <= MAX_API_KEY_BYTES:
        assert parse_credentials({"X-API-Key": key}) == ApiKey(key)
    else:
        with pytest.raises(Refused) as caught:
            parse_credentials({"X-API-Key": key})
        assert caught.value.status == 401


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer a b"},
        {"Authorization": "Bearer tøken"},
        {"Authorization": "Bearer " + "a" * 9000},
        {"Authorization": "Bearer abc", "X-API-Key": "k" * 20},
        {"authorization": "Bearer abc", "Authorization": "Bearer abd"},
        {"X-API-Key": "short"},
        {"X-API-Key": "has a space in the middle"},
    ],
)
def test_missing_malformed_or_doubled_credentials_are_401(headers: dict[str, str]) -> None:
    with pytest.raises(Refused) as caught:
        parse_credentials(headers)
    assert caught.value.status == 401


@given(token=st.text(max_size=400))
def test_any_token_gives_a_jwt_expiry_or_none_and_never_raises(token: str) -> None:
    left = jwt_seconds_left(token, 1000.0)
    assert left is None or left == left


@given(
    secrets=st.lists(
        st.tuples(
            st.text(max_size=20),
            st.dictionaries(st.sampled_from(["troupe.dev/service-account", "x"]), st.text()),
            st.dictionaries(st.sampled_from(["key", "other"]), st.binary(max_size=1100)),
        ),
        max_size=5,
    )
)
def test_every_labelled_secret_is_either_a_key_or_ignored_with_a_reason(
    secrets: list[tuple[str, dict[str, str], dict[str, bytes]]],
) -> None:
    entries, ignored = key_entries(secrets)
    assert len(entries) + len(ignored) == len(secrets)
    for _, why in ignored:
        assert why


def test_an_unavailable_api_server_is_a_distinct_503() -> None:
    unavailable = AuthUnavailable("the Kubernetes API server did not answer; try again")
    assert isinstance(unavailable, Refused)
    assert unavailable.status == 503
    assert unavailable.headers == {"Retry-After": "1"}
