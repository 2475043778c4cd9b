"""Grammars for constrained sampling: JSON Schema -> GBNF.

``json_schema_to_gbnf(schema)`` returns GBNF text (start rule ``root``) whose
sentences are JSON texts valid under the schema; ``JSON_OBJECT_SCHEMA`` is the
schema for "any JSON object". See ``json_schema`` for the supported subset.
"""

from .gbnf import SchemaError
from .json_schema import JSON_OBJECT_SCHEMA, MAX_SCHEMA_BYTES, json_schema_to_gbnf

__all__ = ["json_schema_to_gbnf", "JSON_OBJECT_SCHEMA", "MAX_SCHEMA_BYTES", "SchemaError"]
