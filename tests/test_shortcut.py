"""The shortcut says "valid" only where marshmallow agrees; the problems reported are marshmallow's."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from marshmallow import RAISE, Schema, ValidationError, fields, pre_load, validates_schema

from flask_cio_rudder.schemas import EMAIL_ENVELOPES, GENERIC_ENVELOPE, envelope_schema_for
from flask_cio_rudder.shortcut import Shortcut
from flask_cio_rudder.validation import spec_problems

from .conftest import EMAIL_EVENTS, sample

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


@pytest.mark.slow
@settings(max_examples=1500, database=None, derandomize=True, deadline=None)
@given(body=near_valid_bodies())
def test_a_shortcut_yes_is_marshmallows_yes_and_problems_are_marshmallows_messages(
    body: dict[str, Any],
) -> None:
    schema = envelope_schema_for(body)
    messages = schema.validate(body)
    if Shortcut(schema)(body):
        assert messages == {}
    problems, reported = spec_problems(body)
    assert reported == messages
    assert bool(problems) == bool(messages)


@pytest.mark.parametrize("metric", EMAIL_EVENTS)
def test_the_shortcut_takes_every_sample(metric: str) -> None:
    """If a schema grew a field the shortcut does not know, every event would take marshmallow's path."""
    schema = EMAIL_ENVELOPES[metric]
    assert Shortcut(schema).rules is not None
    assert Shortcut(schema)(sample(metric))
    assert Shortcut(GENERIC_ENVELOPE)(sample(metric))


def test_fields_it_does_not_know_always_take_the_slow_path() -> None:
    class WithDecimal(Schema):
        amount = fields.Decimal()

    class WithHook(Schema):
        name = fields.String()

        @validates_schema
        def check(self, data: dict[str, Any], **kwargs: Any) -> None:
            raise ValidationError("never")

    class WithPreLoad(Schema):
        name = fields.String()

        @pre_load
        def drop(self, data: dict[str, Any], **kwargs: Any) -> dict[str, Any]:
            return {"name": 1}

    class Lenient(Schema):
        count = fields.Integer()  # not strict: marshmallow also takes "3"

    for schema, body in [
        (WithDecimal(), {"amount": "1.5"}),
        (WithHook(), {"name": "x"}),
        (WithPreLoad(), {"name": "x"}),
        (Lenient(), {"count": 3}),
    ]:
        assert not Shortcut(schema)(body)


def test_unknown_raise_is_never_shortcut_at_any_depth() -> None:
    """With ``unknown = RAISE`` an extra key fails marshmallow's load, so the shortcut must not say yes."""

    class Strict(Schema):
        class Meta:
            unknown = RAISE

        name = fields.String()

    class Outer(Schema):
        inner = fields.Nested(Strict)

    class OuterRaising(Schema):
        inner = fields.Nested(Schema.from_dict({"name": fields.String()}), unknown=RAISE)

    cases = [(Strict(), {"name": "x", "extra": 1}), (Outer(), {"inner": {"name": "x", "extra": 1}})]
    cases.append((OuterRaising(), {"inner": {"name": "x", "extra": 1}}))
    for schema, body in cases:
        with pytest.raises(ValidationError):
            schema.load(body)
        assert not Shortcut(schema)(body)
        body.get("inner", body).pop("extra")  # without the extra key, both say yes
        schema.load(body)
        assert Shortcut(schema)(body)


def test_it_checks_presence_nulls_types_and_validators() -> None:
    class Person(Schema):
        name = fields.String(required=True, validate=lambda value: len(value) > 1)
        age = fields.Integer(strict=True, allow_none=True)
        active = fields.Boolean()

    check = Shortcut(Person())
    assert check({"name": "Ada", "age": None, "active": True})
    assert not check({"age": 3})  # required name missing
    assert not check({"name": "A"})  # validator says no
    assert not check({"name": "Ada", "active": None})  # null not allowed
    assert not check({"name": "Ada", "age": True})  # a bool is not an integer
    assert not check({"name": "Ada", "active": "true"})  # marshmallow may take it: it decides
