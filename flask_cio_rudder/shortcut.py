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

# The marshmallow field classes the shortcut understands, and the one JSON type each
# accepts for sure. (marshmallow may accept more, such as "true" for a Boolean: those
# bodies simply take marshmallow's path.) Integer is only understood when ``strict``.
_EXACT_TYPES: dict[type, type] = {fields.String: str, fields.Integer: int, fields.Boolean: bool}


class _Rule(NamedTuple):
    """What one declared field certainly loads, besides ``null`` where ``allow_none``."""

    allow_none: bool
    exact: type | None  # values of exactly this type (a fast test), or else
    accepts: Callable[[Any], bool] | None  # those this test passes
    validators: tuple[Callable[[Any], Any], ...]


class Shortcut:
    """``Shortcut(schema)(data)`` is ``True`` only if ``schema.load(data)`` would succeed.

    A schema it cannot read for certain (a field of a kind it does not know, hooks
    such as ``@validates_schema``) makes it answer ``False`` always: the schema stays
    correct whatever it grows, only slower. Under ``unknown = RAISE`` (marshmallow's
    default, set on the schema or on a ``Nested`` field) a key not declared means "not sure".
    It walks the keys the body has, not every field declared: bodies carry few of them.
    """

    def __init__(self, schema: Schema, unknown: str | None = None) -> None:
        #: The rule of each key (a field's ``data_key`` or name); ``None`` if it cannot be sure.
        self.rules: dict[str, _Rule] | None = None
        self.required: frozenset[str] = frozenset()
        self.raising = (unknown or schema.unknown) == RAISE
        if _has_hooks(schema):
            return
        rules, required = {}, set()
        for name, field in schema.load_fields.items():
            rule = _rule_for(field)
            if rule is None:
                return
            key = field.data_key or name
            rules[key] = rule
            if field.required:
                required.add(key)
        self.rules, self.required = rules, frozenset(required)

    def __call__(self, data: Any) -> bool:
        rules = self.rules
        if rules is None or not (type(data) is dict or isinstance(data, Mapping)):  # dict: no ABC check
            return False
        if not self.required.issubset(data):
            return False
        for key, value in data.items():
            rule = rules.get(key)
            if rule is None:
                if self.raising:
                    return False
                continue
            if value is None:
                if not rule.allow_none:
                    return False
                continue
            if rule.exact is not None:
                if type(value) is not rule.exact:
                    return False
            elif rule.accepts is None or not rule.accepts(value):
                return False
            for validator in rule.validators:
                try:
                    if validator(value) is False:  # marshmallow counts False as a failure too
                        return False
                except ValidationError:
                    return False
        return True


def _rule_for(field: fields.Field) -> _Rule | None:  # type: ignore[type-arg]
    """The rule of one field, or ``None`` where it cannot be sure of marshmallow's answer."""
    exact = _EXACT_TYPES.get(type(field))
    if exact is int and not getattr(field, "strict", False):
        exact = None
    accepts = None if exact is not None else _accepts(field)
    if exact is None and accepts is None:
        return None
    return _Rule(field.allow_none, exact, accepts, tuple(field.validators))


def _has_hooks(schema: Schema) -> bool:
    """Whether the schema declares ``@pre_load``, ``@validates_schema`` or any other hook.

    marshmallow's decorators mark each hook method with ``__marshmallow_hook__``.
    """
    return any(hasattr(member, "__marshmallow_hook__") for _, member in inspect.getmembers(type(schema)))


def _accepts(field: fields.Field) -> Callable[[Any], bool] | None:  # type: ignore[type-arg]
    """A test for the non-null values of a field that is no plain string, integer or boolean."""
    if isinstance(field, fields.Nested):
        if field.many:
            return None
        inner = Shortcut(field.schema, getattr(field, "unknown", None))
        return inner if inner.rules is not None else None
    return getattr(field, "quick_accepts", None)  # a custom field may offer its own test
