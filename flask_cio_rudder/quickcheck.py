"""A fast path for marshmallow loads whose answer is plainly "valid".

marshmallow is what decides whether a body is valid, and what says why not. But a
field-by-field ``Schema.load`` costs tens of microseconds per event, and almost
every body Customer.io sends is plainly valid: each declared field is absent (and
not required), ``null`` (where allowed) or of exactly the JSON type its marshmallow
field declares. :class:`QuickCheck` reads a schema's own field declarations once
and tests just that. It only ever answers "certainly valid" (then marshmallow would
accept the body too) or "not sure", and "not sure" always goes to marshmallow.
``tests/test_quickcheck.py`` holds it to that against marshmallow on generated bodies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

from marshmallow import Schema, ValidationError, fields

__all__ = ["QuickCheck"]

_ABSENT = object()

# The marshmallow field classes the quick check understands, and the one JSON type
# each accepts for sure. (marshmallow may accept more, such as "true" for a Boolean:
# those bodies simply take the slow path.) Integer is only quick when ``strict``.
_EXACT_TYPES: dict[type, type] = {fields.String: str, fields.Integer: int, fields.Boolean: bool}


class _Rule(NamedTuple):
    key: str
    required: bool
    allow_none: bool
    accepts: Callable[[Any], bool]
    validators: list[Callable[[Any], Any]]


class QuickCheck:
    """``QuickCheck(schema)(data)`` is ``True`` only if ``schema.load(data)`` would succeed.

    Fields of a kind it does not know make it answer ``False`` always, so a schema
    can grow any field and stay correct; it only gets slower.
    """

    def __init__(self, schema: Schema) -> None:
        self.rules: list[_Rule] | None = _rules_for(schema)

    def __call__(self, data: Any) -> bool:
        if self.rules is None or not isinstance(data, Mapping):
            return False
        for rule in self.rules:
            value = data.get(rule.key, _ABSENT)
            if value is _ABSENT:
                if rule.required:
                    return False
                continue
            if value is None:
                if not rule.allow_none:
                    return False
                continue
            if not rule.accepts(value):
                return False
            for validator in rule.validators:
                try:
                    if validator(value) is False:  # marshmallow counts False as a failure too
                        return False
                except ValidationError:
                    return False
        return True


def _rules_for(schema: Schema) -> list[_Rule] | None:
    """One rule per field of ``schema``; ``None`` if any field is of a kind not known here,
    or if the schema has hooks (``@validates_schema``, ``@pre_load``...) that it cannot run."""
    if any(getattr(schema, "_hooks", {}).values()):
        return None
    rules = []
    for name, field in schema.load_fields.items():
        accepts = _accepts(field)
        if accepts is None:
            return None
        key = field.data_key or name
        rules.append(_Rule(key, field.required, field.allow_none, accepts, list(field.validators)))
    return rules


def _accepts(field: fields.Field) -> Callable[[Any], bool] | None:  # type: ignore[type-arg]
    """A test for the non-null values ``field`` certainly loads, or ``None`` if unknown."""
    if isinstance(field, fields.Nested):
        inner = QuickCheck(field.schema)
        return inner if inner.rules is not None and not field.many else None
    quick = getattr(field, "quick_accepts", None)  # a custom field may offer its own test
    if quick is not None:
        return quick  # type: ignore[no-any-return]
    exact = _EXACT_TYPES.get(type(field))
    if exact is None or (exact is int and not getattr(field, "strict", False)):
        return None
    return lambda value: type(value) is exact
