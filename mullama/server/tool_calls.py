"""Tool calling on ``/v1/chat/completions``: ``tools``, ``tool_choice``, ``parallel_tool_calls``.

The request's tools are checked (400 naming the problem), rendered through the
model's chat template (:meth:`mullama.Model.apply_chat_template`) and turned
into a grammar on the request's sampler; the one engine generates as for any
request. ``tool_choice``:

- ``"required"`` or a named function: the grammar holds from the first token,
  so the answer is a call (a named choice: exactly one call of that tool);
- ``"auto"`` (the default with tools): the grammar is lazy, the model may
  answer in text, and once it starts a call the call must be valid;
- ``"none"``: the tools are neither rendered nor offered — the request is
  answered as if it had none (past calls and results in the history still
  render).

The answer is parsed in the template's tool format into ``message.tool_calls``
with ``finish_reason: "tool_calls"``; streamed, each call's id and name come
first and its arguments follow in fragments, as OpenAI sends them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mullama.grammar.tool_formats import FORMATS, calls_start, scan_calls, undecided_tail
from mullama.grammar.tools import (
    ToolError,
    check_choice,
    new_call_id,
    parse_tool_calls,
    tool_call_grammar,
    validate_tools,
)
from mullama.params import SamplerParams
from mullama.server.errors import ApiError
from mullama.stream_config import StreamConfig
from mullama.types import TokenData

__all__ = ["ToolRequest", "tool_message_fields"]


def tool_message_fields(msg: dict[str, Any], i: int) -> dict[str, Any]:
    """The tool-related fields of chat message ``i`` (``tool_calls`` of an assistant,
    ``tool_call_id`` / ``name`` of a tool result), checked."""
    out: dict[str, Any] = {}
    calls = msg.get("tool_calls")
    if calls is not None:
        if msg.get("role") != "assistant" or not isinstance(calls, list):
            raise ApiError(400, f"messages[{i}].tool_calls must be a list on an assistant message", param="messages")
        checked = []
        for k, call in enumerate(calls):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) \
                    or not isinstance(fn.get("arguments", ""), str):
                raise ApiError(400, f"messages[{i}].tool_calls[{k}] must have a function with a string name "
                                    "and string arguments", param="messages")
            call_id = call.get("id", "")
            if not isinstance(call_id, str):
                raise ApiError(400, f"messages[{i}].tool_calls[{k}].id must be a string", param="messages")
            checked.append({"id": call_id, "type": "function",
                            "function": {"name": fn["name"], "arguments": fn.get("arguments") or "{}"}})
        if checked:
            out["tool_calls"] = checked
    for key in ("tool_call_id", "name"):
        value = msg.get(key)
        if value is not None:
            if not isinstance(value, str):
                raise ApiError(400, f"messages[{i}].{key} must be a string", param="messages")
            out[key] = value
    return out


@dataclass
class ToolRequest:
    """The tool fields of one chat request, checked; None from :meth:`from_body` when no tool is offered."""

    tools: list[dict[str, Any]]
    choice: str
    parallel: bool
    format: str
    grammar: Any = None

    @classmethod
    def from_body(cls, body: dict[str, Any], model: Any) -> "ToolRequest | None":
        tools, choice = body.get("tools"), body.get("tool_choice")
        parallel = body.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            raise ApiError(400, "'parallel_tool_calls' must be true or false", param="parallel_tool_calls")
        if tools is None or tools == []:
            if choice not in (None, "none", "auto"):
                raise ApiError(400, "'tool_choice' needs 'tools'", param="tool_choice")
            return None
        try:
            checked = validate_tools(tools)
            mode = check_choice(checked, "auto" if choice is None else choice)
            if mode == "none":
                return None
            fmt = model.tool_format()
            grammar = tool_call_grammar(checked, fmt, mode, parallel)  # checks every schema
            model.compile_grammar(grammar.grammar, grammar.triggers)   # llama.cpp's parser, before any work
        except ToolError as exc:
            raise ApiError(400, str(exc), param=exc.param) from None
        except ValueError as exc:  # GrammarError: e.g. a grammar too large for the parser
            raise ApiError(400, f"the tools' grammar cannot be used: {exc}", param="tools") from None
        return cls(checked, mode, parallel, fmt, grammar)

    def template_args(self) -> dict[str, Any]:
        """Extra arguments of ``apply_chat_template`` that render the tools."""
        return {"tools": self.tools, "tool_choice": self.choice}

    def constrain(self, config: StreamConfig) -> StreamConfig:
        """``config`` with the call grammar on its sampler (lazy for ``"auto"``)."""
        sampler = config.sampler
        if config.grammar is not None or config.json_schema is not None \
                or (sampler is not None and sampler.grammar_text is not None):
            raise ApiError(400, "'tools' cannot be combined with another output constraint "
                                "('response_format' or 'grammar')", param="tools")
        try:
            return config.replace(sampler=(sampler or SamplerParams()).replace(**self.grammar.sampler_kwargs()))
        except (TypeError, ValueError) as exc:
            raise ApiError(400, f"the tool grammar could not be used: {exc}", param="tools") from None

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    def shape(self, base: Any) -> "ToolChatShape":
        return ToolChatShape(base, self)


@dataclass
class _Choice:
    """Streaming state of one choice."""

    text: str = ""
    sent: int = 0                      # characters of ``text`` sent as content
    calls_at: int | None = None        # where the calls begin
    args_sent: list[int] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)


class ToolChatShape:
    """The chat answer shape with tool calls: wraps the plain chat shape of ``openai_api``."""

    def __init__(self, base: Any, request: ToolRequest) -> None:
        self.base = base
        self.request = request
        self.fmt = FORMATS[request.format]
        self.states = [_Choice() for _ in base.parts]

    def __getattr__(self, name: str) -> Any:  # endpoint, id_prefix, object, chunk_object
        return getattr(self.base, name)

    def _id(self, state: _Choice, k: int) -> str:
        while len(state.ids) <= k:
            state.ids.append(new_call_id(self.request.format))
        return state.ids[k]

    def _chunk(self, index: int, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}

    # ------------------------------------------------------------ streamed

    def opening(self, index: int) -> dict[str, Any] | None:
        return self.base.opening(index)

    def delta(self, index: int, tok: TokenData) -> list[dict[str, Any]] | None:
        state = self.states[index]
        state.text += tok.text
        out = self._advance(index, state)
        return out or None

    def _advance(self, index: int, state: _Choice) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if state.calls_at is None:
            start = calls_start(state.text, self.fmt)
            if start is None:
                if not self.request.forced:
                    end = len(state.text) - undecided_tail(state.text, self.fmt)
                    if end > state.sent:
                        out.append(self._chunk(index, {"content": state.text[state.sent:end]}))
                        state.sent = end
                return out
            if not self.request.forced and start > state.sent and state.text[state.sent:start].strip():
                out.append(self._chunk(index, {"content": state.text[state.sent:start]}))
            state.sent = start
            state.calls_at = start
        for k, call in enumerate(scan_calls(state.text, state.calls_at)):
            if k >= len(state.args_sent):
                state.args_sent.append(0)
                out.append(self._chunk(index, {"tool_calls": [{
                    "index": k, "id": self._id(state, k), "type": "function",
                    "function": {"name": call.name, "arguments": ""}}]}))
            fragment = call.arguments[state.args_sent[k]:]
            if fragment:
                state.args_sent[k] = len(call.arguments)
                out.append(self._chunk(index, {"tool_calls": [{"index": k, "function": {"arguments": fragment}}]}))
        return out

    def closing(self, index: int, finish: str) -> list[dict[str, Any]]:
        state = self.states[index]
        out = self._advance(index, state)
        result = parse_tool_calls(state.text, self.request.format, state.ids)
        if not result.tool_calls:
            if state.sent < len(state.text):
                out.append(self._chunk(index, {"content": state.text[state.sent:]}))
            out.append(self._chunk(index, {}, finish))
            return out
        for k, call in enumerate(result.tool_calls):
            if k >= len(state.args_sent):  # calls the scanner could not follow while streaming
                out.append(self._chunk(index, {"tool_calls": [{
                    "index": k, "id": self._id(state, k), "type": "function",
                    "function": {"name": call.name, "arguments": call.arguments}}]}))
        out.append(self._chunk(index, {}, "tool_calls" if finish == "stop" else finish))
        return out

    # ------------------------------------------------------------ whole

    def take(self, index: int, tok: TokenData) -> None:
        self.base.take(index, tok)

    def choice(self, index: int, finish: str) -> dict[str, Any]:
        out = self.base.choice(index, finish)
        text = out["message"]["content"]
        result = parse_tool_calls(text, self.request.format, self.states[index].ids)
        if result.tool_calls:
            out["message"] = {"role": "assistant", "content": result.content,
                              "tool_calls": [c.to_openai() for c in result.tool_calls]}
            if finish == "stop":
                out["finish_reason"] = "tool_calls"
        return out
