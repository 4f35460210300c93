"""A shortcut past marshmallow for bodies that plainly meet a schema.

marshmallow is what says whether a body meets Customer.io's schema, and what it
breaks. But a field-by-field validation costs tens of microseconds per event, and
almost every body Customer.io sends plainly meets it: each declared field is
absent (and not required), ``null`` (where allowed) or of exactly the JSON type its
marshmallow field declares. :class:`Shortcut` reads a schema's own field
declarations once and tests just that. It answers only "certainly valid" (then
marshmallow would accept the body too) or "not sure", and "not sure" always goes
to marshmallow. ``tests/test_shortcut.py`` holds it to that on generated bodies.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

from marshmallow import RAISE, Schema, ValidationError, fields

__all__ = ["Shortcut"]

_ABSENT = object()

# The marshmallow field classes the shortcut understands, and the one JSON type each
# accepts for sure. (marshmallow may accept more, such as "true" for a Boolean: those
# bodies simply take marshmallow's path.) Integer is only understood when ``strict``.
_EXACT_TYPES: dict[type, type] = {fields.String: str, fields.Integer: int, fields.Boolean: bool}


class _Rule(NamedTuple):
    key: str
    required: bool
    allow_none: bool
    accepts: Callable[[Any], bool]
    validators: list[Callable[[Any], Any]]


class Shortcut:
    """``Shortcut(schema)(data)`` is ``True`` only if ``schema.load(data)`` would succeed.

    A schema it cannot read for certain (a field of a kind it does not know, hooks
    such as ``@validates_schema``) makes it answer ``False`` always: the schema stays
    correct whatever it grows, only slower. Under ``unknown = RAISE`` (marshmallow's
    default, set on the schema or on a ``Nested`` field) a key not declared means "not sure".
    """

    def __init__(self, schema: Schema, unknown: str | None = None) -> None:
        self.rules: list[_Rule] | None = _rules_for(schema)
        raising = (unknown or schema.unknown) == RAISE
        self.declared: frozenset[str] | None = (
            frozenset(rule.key for rule in self.rules) if raising and self.rules is not None else None
        )

    def __call__(self, data: Any) -> bool:
        if self.rules is None or not isinstance(data, Mapping):
            return False
        if self.declared is not None and not self.declared.issuperset(data):
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
    """One rule per field of ``schema``, or ``None`` where it cannot be sure of marshmallow's answer."""
    if _has_hooks(schema):
        return None
    rules = []
    for name, field in schema.load_fields.items():
        accepts = _accepts(field)
        if accepts is None:
            return None
        key = field.data_key or name
        rules.append(_Rule(key, field.required, field.allow_none, accepts, list(field.validators)))
    return rules


def _has_hooks(schema: Schema) -> bool:
    """Whether the schema declares ``@pre_load``, ``@validates_schema`` or any other hook.

    marshmallow's decorators mark each hook method with ``__marshmallow_hook__``.
    """
    return any(hasattr(member, "__marshmallow_hook__") for _, member in inspect.getmembers(type(schema)))


def _accepts(field: fields.Field) -> Callable[[Any], bool] | None:  # type: ignore[type-arg]
    """A test for the non-null values ``field`` certainly loads, or ``None`` if unknown."""
    if isinstance(field, fields.Nested):
        if field.many:
            return None
        inner = Shortcut(field.schema, getattr(field, "unknown", None))
        return inner if inner.rules is not None else None
    quick = getattr(field, "quick_accepts", None)  # a custom field may offer its own test
    if quick is not None:
        return quick  # type: ignore[no-any-return]
    exact = _EXACT_TYPES.get(type(field))
    if exact is None or (exact is int and not getattr(field, "strict", False)):
        return None
    return lambda value: type(value) is exact
