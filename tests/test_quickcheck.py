"""The quick check may only ever say "valid" where marshmallow agrees, with the same result."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import Schema, ValidationError, fields, validates_schema

from flask_cio_rudder.quickcheck import QuickCheck
from flask_cio_rudder.schemas import EMAIL_ENVELOPES, envelope_schema_for, load_envelope

from .conftest import EMAIL_EVENTS, sample

ENVELOPE_KEYS = ("event_id", "object_type", "metric", "timestamp")

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)
# Wrong scalars are the likeliest mistakes (a bool where an integer goes, a number for a string).
retyped = st.one_of(
    st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8), json_values
)


@st.composite
def near_valid_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A sample email event with a few keys (top level, in data or identifiers) removed, nulled or retyped."""
    body = sample(draw(st.sampled_from(EMAIL_EVENTS)))
    for _ in range(draw(st.integers(0, 3))):
        data = body.get("data")
        objects = [body, data, data.get("identifiers")] if isinstance(data, dict) else [body]
        target = draw(st.sampled_from([each for each in objects if isinstance(each, dict)]))
        key = draw(st.sampled_from([*sorted(target), "extra"]))
        change = draw(st.sampled_from(["delete", "null", "retype"]))
        if change == "delete":
            target.pop(key, None)
        else:
            target[key] = None if change == "null" else draw(retyped)
    return body


@settings(max_examples=1500, database=None, derandomize=True, deadline=None)
@given(body=near_valid_bodies())
def test_a_quick_yes_is_marshmallows_yes_with_the_same_envelope(body: dict[str, Any]) -> None:
    schema = envelope_schema_for(body)
    try:
        expected = schema.load(body)
    except ValidationError as error:
        with pytest.raises(ValidationError) as raised:
            load_envelope(body)
        assert raised.value.messages == error.messages
        return
    assert {key: load_envelope(body)[key] for key in ENVELOPE_KEYS} == {
        key: expected.get(key) for key in ENVELOPE_KEYS
    }


@pytest.mark.parametrize("metric", EMAIL_EVENTS)
def test_the_quick_check_takes_every_sample(metric: str) -> None:
    """If a schema grew a field the quick check does not know, every event would take the slow path."""
    schema = EMAIL_ENVELOPES[metric]
    assert QuickCheck(schema).rules is not None
    assert QuickCheck(schema)(sample(metric))


def test_fields_it_does_not_know_always_take_the_slow_path() -> None:
    class WithDecimal(Schema):
        amount = fields.Decimal()

    class WithHook(Schema):
        name = fields.String()

        @validates_schema
        def check(self, data: dict[str, Any], **kwargs: Any) -> None:
            raise ValidationError("never")

    class Lenient(Schema):
        count = fields.Integer()  # not strict: marshmallow also takes "3"

    assert not QuickCheck(WithDecimal())({"amount": "1.5"})
    assert not QuickCheck(WithHook())({"name": "x"})
    assert not QuickCheck(Lenient())({"count": 3})


def test_it_checks_presence_nulls_types_and_validators() -> None:
    class Person(Schema):
        name = fields.String(required=True, validate=lambda value: len(value) > 1)
        age = fields.Integer(strict=True, allow_none=True)
        active = fields.Boolean()

    check = QuickCheck(Person())
    assert check({"name": "Ada", "age": None, "active": True})
    assert not check({"age": 3})  # required name missing
    assert not check({"name": "A"})  # validator says no
    assert not check({"name": "Ada", "active": None})  # null not allowed
    assert not check({"name": "Ada", "age": True})  # a bool is not an integer
    assert not check({"name": "Ada", "active": "true"})  # marshmallow may take it: slow path decides
