"""orjson on the hot path means exactly what the json module means (``flask_cio_rudder/jsoncodec.py``).

Decoding is compared with the webhook's reference decoding (``json`` with exact integers and
no NaN) on generated JSON texts, including what orjson refuses or reads differently: integers
beyond 64 bits, lone surrogates, numbers beyond a float's range, deep nesting. Encoding is
compared by meaning: what ``jsoncodec.dumps`` writes decodes to what ``json`` would have written.
"""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from flask_cio_rudder import jsoncodec
from flask_cio_rudder.webhook import _json_loads

REFERENCE_ENCODER = json.JSONEncoder(separators=(",", ":"), allow_nan=False)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()  # any size: beyond 64 bits too
    | st.integers(-(2**70), 2**70)
    | st.floats()  # NaN and infinity too
    | st.text()  # lone surrogates too
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def same(first: Any, second: Any) -> bool:
    """Equal, with the same types all the way down (1 is not 1.0), NaN equal to NaN.

    A loop, not recursion: Python 3.12+ decodes arrays nested far deeper than the recursion limit.
    """
    pairs = [(first, second)]
    while pairs:
        one, other = pairs.pop()
        if type(one) is not type(other):
            return False
        if isinstance(one, dict):
            if list(one) != list(other):
                return False
            pairs.extend((one[key], other[key]) for key in one)
        elif isinstance(one, list):
            if len(one) != len(other):
                return False
            pairs.extend(zip(one, other))
        elif isinstance(one, float) and math.isnan(one):
            if not math.isnan(other):
                return False
        elif one != other:
            return False
    return True


def outcome(function: Any, argument: Any) -> tuple[str, Any]:
    try:
        return "value", function(argument)
    except (ValueError, RecursionError) as error:
        return "error", type(error)


def texts_of(value: Any) -> list[bytes]:
    """How a sender may spell ``value``: compact or spaced, escaped or UTF-8 (lone surrogates escaped)."""
    spellings = [json.dumps(value).encode()]
    with contextlib.suppress(UnicodeEncodeError):  # a lone surrogate has no UTF-8 spelling
        spellings.append(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode())
    return spellings


@given(values)
def test_decoding_gives_what_json_gives(value: Any) -> None:
    for text in texts_of(value):
        fast, reference = outcome(lambda b: jsoncodec.loads(b, _json_loads), text), outcome(_json_loads, text)
        assert fast[0] == reference[0] and same(fast[1], reference[1]), text


@pytest.mark.parametrize(
    "text",
    [
        b"123456789012345678901234567890",
        b"-9223372036854775809",
        b"18446744073709551616",
        b'{"n": 99999999999999999999999}',
        b'"\\ud800"',
        b"1e999",
        b"NaN",
        b"[" * 2000 + b"]" * 2000,
        b"\xef\xbb\xbf{}",
        '{"a": 1}'.encode("utf-16"),
        b'{"a": "\x00"}',
        b"",
        b"{",
    ],
)
def test_what_orjson_reads_otherwise_is_read_as_json_reads_it(text: bytes) -> None:
    fast, reference = outcome(lambda b: jsoncodec.loads(b, _json_loads), text), outcome(_json_loads, text)
    assert fast[0] == reference[0] and same(fast[1], reference[1])


@given(values)
def test_encoding_means_what_json_would_write(value: Any) -> None:
    fast, reference = (
        outcome(lambda v: jsoncodec.dumps(v, REFERENCE_ENCODER.encode), value),
        outcome(REFERENCE_ENCODER.encode, value),
    )
    assert fast[0] == reference[0]
    if fast[0] == "value":
        assert same(_json_loads(fast[1].encode("utf-8", "surrogatepass")), _json_loads(reference[1].encode()))


def test_nan_and_infinity_are_refused_as_json_refuses_them() -> None:
    for value in (math.nan, math.inf, {"x": [-math.inf]}):
        with pytest.raises(ValueError):
            jsoncodec.dumps(value, REFERENCE_ENCODER.encode)
