"""Grammars for constrained sampling: JSON Schema -> GBNF, and tool calls.

``json_schema_to_gbnf(schema)`` returns GBNF text (start rule ``root``) whose
sentences are JSON texts valid under the schema; ``JSON_OBJECT_SCHEMA`` is the
schema for "any JSON object". See ``json_schema`` for the supported subset.

Tool calls (see ``tools`` and ``tool_formats``): ``validate_tools`` checks
OpenAI function tools, ``tool_call_grammar`` builds the grammar that forces
(or, lazily, allows) a call in a model family's format, ``parse_tool_calls``
reads a finished answer into a ``ChatResult``.
"""

from .gbnf import SchemaError
from .json_schema import JSON_OBJECT_SCHEMA, MAX_SCHEMA_BYTES, json_schema_to_gbnf
from .tool_formats import detect_tool_format
from .tools import (
    ChatResult,
    ToolCall,
    ToolError,
    ToolGrammar,
    parse_tool_calls,
    prepare_chat_messages,
    tool_call_grammar,
    validate_tools,
)

__all__ = [
    "json_schema_to_gbnf", "JSON_OBJECT_SCHEMA", "MAX_SCHEMA_BYTES", "SchemaError",
    "ChatResult", "ToolCall", "ToolError", "ToolGrammar", "detect_tool_format", "parse_tool_calls",
    "prepare_chat_messages", "tool_call_grammar", "validate_tools",
]
