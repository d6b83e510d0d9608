"""Validating a raw row and converting it to one canonical conversation, with every reason it is unusable.

The rules are LLaMA-Factory's (parser.py, converter.py, processor/supervised.py) made explicit: where the engine
would silently skip a row or train on a broken one, this module names the row and the reason.

Canonical form (what the prepared directory holds, LLaMA-Factory's sharegpt with default tags):
    {"conversations": [{"from": "human"|"gpt"|"observation"|"function_call", "value": str}, ...],
     "system": str, "tools": str}
An alpaca row becomes: its history pairs as turns, then "instruction\ninput" -> output (the engine's own join).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from npu_sft.datasets.builtin import fill_identity
from npu_sft.datasets.reading import Reason
from npu_sft.datasets.settings import DatasetSpec, ResolvedColumns, ResolvedTags

# LLaMA-Factory's roles (data_utils.Role) and the sharegpt tags the canonical form writes for them.
USER, ASSISTANT, OBSERVATION, FUNCTION = "user", "assistant", "observation", "function"
CANONICAL_TAGS = {USER: "human", ASSISTANT: "gpt", OBSERVATION: "observation", FUNCTION: "function_call"}
_PROMPT_SIDE = (USER, OBSERVATION)  # turns 1, 3, 5...
_RESPONSE_SIDE = (ASSISTANT, FUNCTION)  # turns 2, 4, 6...
# The OpenAI converter joins consecutive tool results into one observation turn with this separator.
_TOOL_RESPONSE_JOINER = "\n</tool_response>\n<tool_response>\n"

# Lone surrogates: undecodable bytes (read with surrogateescape) or a \udXXX escape without its pair.
_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclass(frozen=True)
class Conversation:
    system: str
    turns: tuple[tuple[str, str], ...]  # (role, content), alternating prompt side / response side
    tools: str

    def texts(self) -> list[str]:
        """The texts a chat template wraps, one per message (system first when present)."""
        contents = [content for _, content in self.turns]
        return [self.system, *contents] if self.system else contents

    def to_record(self) -> dict[str, Any]:
        return {
            "conversations": [{"from": CANONICAL_TAGS[role], "value": content} for role, content in self.turns],
            "system": self.system,
            "tools": self.tools,
        }


@dataclass(frozen=True)
class Identity:
    name: str
    author: str


class RowNormalizer:
    """Validates and converts the rows of one dataset spec."""

    def __init__(self, spec: DatasetSpec, identity: Identity | None) -> None:
        self._format = spec.format
        self._columns: ResolvedColumns = spec.resolved_columns()
        self._tags: ResolvedTags = spec.resolved_tags()
        self._identity = identity if spec.fills_identity() else None

    def normalize(self, row: Any) -> Conversation | list[Reason]:
        if not isinstance(row, dict):
            return [Reason("wrong_type", f"row must be an object, got {_json_type(row)}")]
        reasons: list[Reason] = []
        if self._format == "alpaca":
            conversation = self._alpaca(row, reasons)
        else:
            conversation = self._messages(row, reasons)
        if reasons:
            return reasons
        if self._identity is not None:
            return _with_identity(conversation, self._identity)
        return conversation

    # alpaca ---------------------------------------------------------------------------------------------------

    def _alpaca(self, row: dict[str, Any], reasons: list[Reason]) -> Conversation:
        columns = self._columns
        instruction = _text_field(row, columns.prompt, reasons, required=True)
        query = _text_field(row, columns.query, reasons, required=False)
        output = _text_field(row, columns.response, reasons, required=True)
        if _is_blank_text(row.get(columns.prompt)) and not query.strip():
            reasons.append(Reason("empty_field", f"empty field '{columns.prompt}' (and no '{columns.query}')"))
        if _is_blank_text(row.get(columns.response)):
            reasons.append(Reason("empty_field", f"empty field '{columns.response}'"))
        turns = self._history_turns(row, reasons)
        # The engine's join: "instruction\ninput", leaving out whichever is empty.
        prompt = "\n".join(part for part in (instruction, query) if part)
        turns += [(USER, prompt), (ASSISTANT, output)]
        system = _text_field(row, columns.system, reasons, required=False)
        tools = self._tools(row, reasons)
        return Conversation(system=system, turns=tuple(turns), tools=tools)

    def _history_turns(self, row: dict[str, Any], reasons: list[Reason]) -> list[tuple[str, str]]:
        column = self._columns.history
        history = _decoded_json_cell(row.get(column))
        if history is None or history == "":
            return []
        if not isinstance(history, list):
            expected = "an array of [prompt, response] pairs"
            reasons.append(Reason("wrong_type", f"field '{column}' must be {expected}, got {_json_type(history)}"))
            return []
        turns: list[tuple[str, str]] = []
        for index, pair in enumerate(history, start=1):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(part, str) for part in pair)):
                reasons.append(Reason("wrong_type", f"{column}[{index}] must be a [prompt, response] pair of strings"))
                continue
            for part, side in zip(pair, ("prompt", "response"), strict=True):
                if not part.strip():
                    reasons.append(Reason("empty_field", f"{column}[{index}] has an empty {side}"))
                elif _SURROGATE.search(part):
                    reasons.append(_non_utf8_reason(f"{column}[{index}]"))
            turns += [(USER, pair[0]), (ASSISTANT, pair[1])]
        return turns

    # sharegpt / openai ----------------------------------------------------------------------------------------

    def _messages(self, row: dict[str, Any], reasons: list[Reason]) -> Conversation:
        column = self._columns.messages
        messages = _decoded_json_cell(row.get(column))
        system = _text_field(row, self._columns.system, reasons, required=False)
        tools = self._tools(row, reasons)
        if messages is None:
            reasons.append(Reason("missing_field", f"missing field '{column}'"))
            return Conversation(system, (), tools)
        if not isinstance(messages, list):
            reasons.append(Reason("wrong_type", f"field '{column}' must be an array, got {_json_type(messages)}"))
            return Conversation(system, (), tools)
        if not messages:
            reasons.append(Reason("empty_conversation", f"empty conversation: '{column}' has no messages"))
            return Conversation(system, (), tools)
        turns, numbers, system = self._aligned_turns(messages, system, reasons)
        if not reasons:
            _check_role_order(turns, numbers, self._tags, reasons)
        return Conversation(system=system, turns=tuple(turns), tools=tools)

    def _aligned_turns(
        self, messages: list[Any], system: str, reasons: list[Reason]
    ) -> tuple[list[tuple[str, str]], list[int], str]:
        """(role, content) turns, the 1-based message number of each, and the system prompt."""
        tags = self._tags
        roles = {tags.user: USER, tags.assistant: ASSISTANT, tags.observation: OBSERVATION, tags.function: FUNCTION}
        turns: list[tuple[str, str]] = []
        numbers: list[int] = []
        for number, message in enumerate(messages, start=1):
            if not isinstance(message, dict):
                reasons.append(Reason("wrong_type", f"message {number} must be an object, got {_json_type(message)}"))
                continue
            tag = message.get(tags.role)
            if tag is None:
                reasons.append(Reason("missing_field", f"message {number} has no '{tags.role}'"))
                continue
            if tag == tags.system:
                system = self._system_message(message, number, reasons) or system
                continue
            if not isinstance(tag, str) or tag not in roles:
                known = ", ".join(f"'{name}'" for name in (*roles, tags.system))
                reasons.append(Reason("unknown_role", f"message {number} has role {tag!r}, expected one of {known}"))
                continue
            role, content = self._message_content(message, number, roles[tag], reasons)
            if role == OBSERVATION and self._format == "openai" and turns and turns[-1][0] == OBSERVATION:
                turns[-1] = (OBSERVATION, turns[-1][1] + _TOOL_RESPONSE_JOINER + content)
                continue
            turns.append((role, content))
            numbers.append(number)
        if not turns and not reasons:
            reasons.append(Reason("empty_conversation", "empty conversation: no user or assistant message"))
        return turns, numbers, system

    def _system_message(self, message: dict[str, Any], number: int, reasons: list[Reason]) -> str:
        if number != 1:
            reasons.append(Reason("wrong_role_order", f"message {number}: a system message is only allowed first"))
            return ""
        content = message.get(self._tags.content)
        if not isinstance(content, str):
            reasons.append(Reason("wrong_type", f"message {number}: system content must be a string"))
            return ""
        return content

    def _message_content(
        self, message: dict[str, Any], number: int, role: str, reasons: list[Reason]
    ) -> tuple[str, str]:
        tags = self._tags
        tool_calls = message.get("tool_calls") if self._format == "openai" and role == ASSISTANT else None
        if tool_calls:
            # The OpenAI converter turns an assistant's tool calls into a function-call turn of their JSON.
            if not (isinstance(tool_calls, list) and all(_is_tool_call(call) for call in tool_calls)):
                reasons.append(Reason("wrong_type", f"message {number}: tool_calls must be a list of {{function}}"))
                return FUNCTION, ""
            return FUNCTION, json.dumps([call["function"] for call in tool_calls], ensure_ascii=False)
        content = message.get(tags.content)
        if content is None:
            reasons.append(Reason("missing_field", f"message {number} has no '{tags.content}'"))
        elif not isinstance(content, str):
            reasons.append(
                Reason("wrong_type", f"message {number}: '{tags.content}' must be a string, got {_json_type(content)}")
            )
        elif not content.strip():
            reasons.append(Reason("empty_field", f"message {number} has empty content"))
        elif _SURROGATE.search(content):
            reasons.append(_non_utf8_reason(f"message {number}"))
        else:
            return role, content
        return role, ""

    def _tools(self, row: dict[str, Any], reasons: list[Reason]) -> str:
        column = self._columns.tools
        tools = row.get(column)
        if tools is None:
            return ""
        if self._format == "openai" and isinstance(tools, (list, dict)):
            return json.dumps(tools, ensure_ascii=False)  # what the OpenAI converter does
        if not isinstance(tools, str):
            reasons.append(Reason("wrong_type", f"field '{column}' must be a string, got {_json_type(tools)}"))
            return ""
        return tools


def _with_identity(conversation: Conversation, identity: Identity) -> Conversation:
    name, author = identity.name, identity.author
    return Conversation(
        system=fill_identity(conversation.system, name, author),
        turns=tuple((role, fill_identity(content, name, author)) for role, content in conversation.turns),
        tools=conversation.tools,
    )


def _check_role_order(
    turns: list[tuple[str, str]], numbers: list[int], tags: ResolvedTags, reasons: list[Reason]
) -> None:
    """User (or tool result) and assistant (or function call) must alternate, starting with the user and ending
    with the assistant: the engine drops any other shape."""
    tag_of = {USER: tags.user, ASSISTANT: tags.assistant, OBSERVATION: tags.observation, FUNCTION: tags.function}
    for index, ((role, _), number) in enumerate(zip(turns, numbers, strict=True)):
        expected = _PROMPT_SIDE if index % 2 == 0 else _RESPONSE_SIDE
        if role not in expected:
            wanted = " or ".join(f"'{tag_of[name]}'" for name in expected)
            reasons.append(
                Reason("wrong_role_order", f"wrong role order: message {number} is '{tag_of[role]}', expected {wanted}")
            )
            return
    if len(turns) % 2 != 0:
        last = tag_of[turns[-1][0]]
        reasons.append(
            Reason(
                "wrong_role_order",
                f"wrong role order: the conversation ends with '{last}', it must end with '{tags.assistant}'",
            )
        )


def _text_field(row: dict[str, Any], column: str, reasons: list[Reason], *, required: bool) -> str:
    value = row.get(column)
    if value is None:
        if required:
            reasons.append(Reason("missing_field", f"missing field '{column}'"))
        return ""
    if not isinstance(value, str):
        reasons.append(Reason("wrong_type", f"field '{column}' must be a string, got {_json_type(value)}"))
        return ""
    if _SURROGATE.search(value):
        reasons.append(_non_utf8_reason(f"field '{column}'"))
    return value


def _is_blank_text(value: Any) -> bool:
    return isinstance(value, str) and not value.strip()


def _decoded_json_cell(value: Any) -> Any:
    """A list-valued field from CSV arrives as a JSON string; decode it so CSV can carry history and messages."""
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def _is_tool_call(call: Any) -> bool:
    return isinstance(call, dict) and isinstance(call.get("function"), dict)


def _non_utf8_reason(where: str) -> Reason:
    return Reason("non_utf8", f"{where} contains bytes that are not valid UTF-8")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
