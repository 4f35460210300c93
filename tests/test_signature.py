"""Customer.io's signature: the known answer, rotation, and every way a header can be wrong."""

from __future__ import annotations

import pytest

from flask_cio_rudder.signature import SignatureError, sign, verify

KNOWN_BODY = b'{"hello": "world"}'  # 18 bytes, one space after the colon, as Customer.io's docs give it
KNOWN_SIGNATURE = "2380722c30fe151144a151cbbf6b5a207291314d78582594cb18bcdb66098d5c"


def test_known_answer_from_customerio_docs() -> None:
    assert sign(KNOWN_BODY, "1536353830", "abcd") == KNOWN_SIGNATURE
    verify(KNOWN_BODY, "1536353830", KNOWN_SIGNATURE, ["abcd"])


def test_any_of_several_keys_verifies_so_keys_can_rotate() -> None:
    verify(KNOWN_BODY, "1536353830", KNOWN_SIGNATURE, ["new-key", "abcd"])


@pytest.mark.parametrize(
    ("body", "timestamp", "signature", "reason"),
    [
        (KNOWN_BODY, "1536353830", None, "missing X-CIO-Signature"),
        (KNOWN_BODY, "1536353830", "", "missing X-CIO-Signature"),
        (KNOWN_BODY, None, KNOWN_SIGNATURE, "missing X-CIO-Timestamp"),
        (KNOWN_BODY, "1536353830", KNOWN_SIGNATURE[:-2], "expected 64 hex characters"),
        (KNOWN_BODY, "1536353830", KNOWN_SIGNATURE + "00", "expected 64 hex characters"),
        (KNOWN_BODY, "1536353830", "z" * 64, "not hexadecimal"),
        (KNOWN_BODY, "1536353830", "0" * 64, "does not match"),
        (KNOWN_BODY + b" ", "1536353830", KNOWN_SIGNATURE, "does not match"),
        (KNOWN_BODY, "1536353831", KNOWN_SIGNATURE, "does not match"),
        (KNOWN_BODY, "1536353830\u0100", KNOWN_SIGNATURE, "malformed X-CIO-Timestamp"),
    ],
)
def test_wrong_or_malformed_headers_are_refused_with_a_reason(
    body: bytes, timestamp: str | None, signature: str | None, reason: str
) -> None:
    with pytest.raises(SignatureError, match=reason):
        verify(body, timestamp, signature, ["abcd"])


def test_the_wrong_key_is_refused() -> None:
    with pytest.raises(SignatureError, match="does not match"):
        verify(KNOWN_BODY, "1536353830", KNOWN_SIGNATURE, ["abce"])


def test_an_uppercase_signature_still_matches() -> None:
    verify(KNOWN_BODY, "1536353830", KNOWN_SIGNATURE.upper(), ["abcd"])


def test_max_age_is_off_unless_configured() -> None:
    verify(KNOWN_BODY, "1536353830", KNOWN_SIGNATURE, ["abcd"], now=2_000_000_000)


def test_max_age_refuses_a_timestamp_too_far_from_now() -> None:
    verify(KNOWN_BODY, "1536353830", KNOWN_SIGNATURE, ["abcd"], max_age=300, now=1536353830 + 300)
    with pytest.raises(SignatureError, match="CIO_RUDDER_MAX_TIMESTAMP_AGE"):
        verify(KNOWN_BODY, "1536353830", KNOWN_SIGNATURE, ["abcd"], max_age=300, now=1536353830 + 301)
    with pytest.raises(SignatureError, match="CIO_RUDDER_MAX_TIMESTAMP_AGE"):
        verify(KNOWN_BODY, "1536353830", KNOWN_SIGNATURE, ["abcd"], max_age=300, now=1536353830 - 301)


def test_max_age_needs_a_numeric_timestamp() -> None:
    signature = sign(KNOWN_BODY, "yesterday", "abcd")
    with pytest.raises(SignatureError, match="not Unix seconds"):
        verify(KNOWN_BODY, "yesterday", signature, ["abcd"], max_age=300)
