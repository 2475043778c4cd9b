"""Constrained output: JSON Schema -> GBNF and tool-call formats."""

from mullama.grammar.tool_formats import detect_tool_format
from mullama.grammar.tools import (
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
    "ChatResult",
    "ToolCall",
    "ToolError",
    "ToolGrammar",
    "detect_tool_format",
    "parse_tool_calls",
    "prepare_chat_messages",
    "tool_call_grammar",
    "validate_tools",
]
