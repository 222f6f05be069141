"""A corpus of JSON schemas of increasing difficulty for the constrained-decoding tests and benchmark.

Strings carry a maxLength, numbers a range and arrays a maxItems where the model could otherwise write for ever
(a grammar allows an integer of a thousand digits); a multipleOf is a power of two, which the validator's float
division checks exactly: the tests ask for a complete document within a token budget,
at temperature 1.0, from a 135M-parameter model.
"""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "maxLength": 24}
SHORT = {"type": "string", "maxLength": 12}
INT = {"type": "integer", "minimum": -999, "maximum": 999}
NUM = {"type": "number", "minimum": -1000, "maximum": 1000, "multipleOf": 0.25}


def _object(properties: dict[str, Any], required: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties) if required is None else required,
        "additionalProperties": False,
        **extra,
    }


SCHEMAS: list[dict[str, Any]] = [
    # scalars
    {"type": "boolean"},
    INT,
    {"type": "integer", "minimum": 1, "maximum": 6},
    {"type": "number", "minimum": -1, "maximum": 1, "multipleOf": 0.0625},
    {"type": "string", "maxLength": 16},
    {"type": "string", "minLength": 3, "maxLength": 8},
    {"type": "null"},
    {"enum": ["red", "green", "blue"]},
    {"const": "fixed"},
    {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"},
    # string formats
    {"type": "string", "format": "date"},
    {"type": "string", "format": "time"},
    {"type": "string", "format": "date-time"},
    {"type": "string", "format": "email", "maxLength": 40},
    {"type": "string", "format": "uuid"},
    {"type": "string", "format": "ipv4"},
    # flat objects
    _object({"name": NAME}),
    _object({"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 130}}),
    _object({"ok": {"type": "boolean"}, "code": INT, "note": SHORT}),
    _object({"city": NAME, "country": {"enum": ["FR", "DE", "JP", "US"]}}),
    _object({"id": {"type": "string", "format": "uuid"}, "created": {"type": "string", "format": "date-time"}}),
    _object({"a": SHORT, "b": SHORT}, required=["a"]),
    _object({"score": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.5}, "label": SHORT}),
    _object({"status": {"const": "ok"}, "count": {"type": "integer", "minimum": 0, "maximum": 99}}),
    # arrays
    {"type": "array", "items": INT, "maxItems": 5},
    {"type": "array", "items": SHORT, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 2, "maxItems": 2},
    {"type": "array", "items": {"enum": ["a", "b", "c"]}, "minItems": 1, "maxItems": 4},
    _object({"tags": {"type": "array", "items": SHORT, "maxItems": 3}}),
    _object(
        {
            "matrix": {
                "type": "array",
                "items": {"type": "array", "items": INT, "maxItems": 3},
                "maxItems": 3,
            }
        }
    ),
    {"type": "array", "prefixItems": [INT, SHORT], "items": False},
    # nested objects
    _object({"user": _object({"name": NAME, "email": {"type": "string", "format": "email", "maxLength": 40}})}),
    _object({"point": _object({"x": NUM, "y": NUM})}),
    _object({"a": _object({"b": _object({"c": _object({"d": INT})})})}),
    _object(
        {
            "items": {
                "type": "array",
                "items": _object({"sku": SHORT, "qty": {"type": "integer", "minimum": 1, "maximum": 9}}),
                "maxItems": 3,
            }
        }
    ),
    _object(
        {
            "meta": _object(
                {
                    "version": INT,
                    "flags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
                }
            )
        }
    ),
    # anyOf / oneOf / type unions
    {"anyOf": [INT, {"type": "string", "maxLength": 10}]},
    {"type": ["string", "null"], "maxLength": 10},
    _object({"value": {"anyOf": [NUM, {"type": "boolean"}, {"type": "null"}]}}),
    _object(
        {
            "shape": {
                "anyOf": [
                    _object({"kind": {"const": "circle"}, "r": NUM}),
                    _object({"kind": {"const": "square"}, "side": NUM}),
                ]
            }
        }
    ),
    {"oneOf": [_object({"ok": {"const": True}}), _object({"error": SHORT})]},
    _object({"id": {"anyOf": [INT, {"type": "string", "format": "uuid"}]}}),
    # $ref and $defs
    {"$defs": {"name": NAME}, **_object({"first": {"$ref": "#/$defs/name"}, "last": {"$ref": "#/$defs/name"}})},
    {
        "$defs": {"point": _object({"x": INT, "y": INT})},
        **_object({"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}}),
    },
    {
        # References that reference references (a recursive one could nest past any token budget).
        "$defs": {
            "leaf": _object({"v": INT}),
            "node": _object({"v": INT, "next": {"anyOf": [{"$ref": "#/$defs/leaf"}, {"type": "null"}]}}),
        },
        "$ref": "#/$defs/node",
    },
    {
        "definitions": {"tag": {"enum": ["x", "y"]}},
        "type": "array",
        "items": {"$ref": "#/definitions/tag"},
        "maxItems": 4,
    },
    # harder: pydantic-style documents
    _object(
        {
            "title": NAME,
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "genres": {"type": "array", "items": {"enum": ["drama", "comedy", "horror", "sci-fi"]}, "maxItems": 2},
            "rating": {
                "anyOf": [{"type": "number", "minimum": 0, "maximum": 5, "multipleOf": 0.125}, {"type": "null"}]
            },
        }
    ),
    _object(
        {
            "order_id": {"type": "string", "pattern": "^ORD-[0-9]{4}$"},
            "lines": {
                "type": "array",
                "minItems": 1,
                "maxItems": 2,
                "items": _object(
                    {"sku": SHORT, "price": {"type": "number", "minimum": 0, "maximum": 1000, "multipleOf": 0.25}}
                ),
            },
            "paid": {"type": "boolean"},
        }
    ),
    _object(
        {
            "event": {"enum": ["login", "logout"]},
            "at": {"type": "string", "format": "date-time"},
            "source": _object({"ip": {"type": "string", "format": "ipv4"}, "agent": SHORT}),
        }
    ),
    _object(
        {
            "name": NAME,
            "arguments": _object({"location": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}}),
        }
    ),
    {
        "$defs": {
            "step": _object({"op": {"enum": ["add", "mul"]}, "arg": {"type": "integer", "minimum": 0, "maximum": 9}})
        },
        **_object(
            {
                "steps": {"type": "array", "items": {"$ref": "#/$defs/step"}, "minItems": 1, "maxItems": 3},
                "result": INT,
            }
        ),
    },
]
