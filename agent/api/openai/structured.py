"""Structured outputs: `response_format` (JSON mode and JSON schemas) turned into a grammar for the engine.

The engine host samples only tokens the grammar allows (engines/runtime/grammar.py), so the output is valid by
construction, not checked and retried. The schema is always enforced exactly, whatever `strict` says: OpenAI's
`strict: false` only means "no guarantee", and a guarantee we can give costs nothing. A schema keyword the
grammar engine cannot enforce is a 400 naming it, never silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.errors import InvalidRequestError, UnsupportedParameterError
from engines.runtime.grammar import SchemaError, json_schema_grammar

SCHEMA_PARAM = "response_format.json_schema.schema"


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: OpenAI's name (required), description, schema and strict."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    # `schema` would shadow a BaseModel attribute; the wire name stays "schema".
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """response_format: text (the default), json_object, or json_schema with its schema."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise InvalidRequestError(
                "Missing required parameter: 'response_format.json_schema'",
                param="response_format.json_schema",
                code="missing_required_parameter",
            )
        if self.type != "json_schema" and self.json_schema is not None:
            raise InvalidRequestError(
                f"'response_format.json_schema' is only allowed with type 'json_schema', not {self.type!r}",
                param="response_format.json_schema",
                code="invalid_value",
            )
        return self

    def answer_schema(self) -> dict[str, Any] | None:
        """The JSON schema the answer must match (json_object: any object); None for plain text."""
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "object"}
        assert self.json_schema is not None  # the validator above
        return self.json_schema.schema_ or {}

    def grammar(self) -> str | None:
        """The grammar the output must follow (None for plain text); a 400 for a schema we cannot enforce."""
        schema = self.answer_schema()
        return None if schema is None else schema_grammar(schema, SCHEMA_PARAM)


def schema_grammar(schema: dict[str, Any], param: str) -> str:
    """The grammar of a client's JSON schema at `param`; 400s name the keyword or say what is invalid."""
    try:
        return json_schema_grammar(schema)
    except SchemaError as exc:
        if exc.keyword is not None:
            raise UnsupportedParameterError(f"{exc} (in '{param}')", param=param) from None
        raise InvalidRequestError(f"Invalid value for '{param}': {exc}", param=param, code="invalid_value") from None
