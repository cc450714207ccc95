"""A scripted chat model for offline tests and examples: it streams text, reasoning and tool calls, and binds tools."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.tool import ToolCall, tool_call_chunk
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from pydantic import Field

__all__ = ["FakeToolCallingChatModel"]

_TOKEN = re.compile(r"\s+|\S+")

Reply = str | AIMessage


class FakeToolCallingChatModel(BaseChatModel):
    """A chat model that answers from a script, for tests and examples that must run offline.

    Each call takes the next reply of ``responses`` (or asks ``respond(messages)``, which sees the conversation,
    so a steer can change what comes next). A reply is a string or an :class:`~langchain_core.messages.AIMessage`:
    its text streams a word at a time, list content streams block by block (``reasoning``, Anthropic-style
    ``thinking`` and ``text`` blocks), ``additional_kwargs`` such as ``reasoning_content`` stream in pieces, and
    ``tool_calls`` stream as tool-call chunks (name and id first, then the JSON arguments in pieces). Tool calls
    without an id get ``call_1``, ``call_2``... ``bind_tools`` works as with a real model, and a scripted tool call
    to a tool that is not bound raises :class:`ValueError`.

    ``sleep`` pauses before each chunk (``asyncio.sleep`` on the async path), so a test can cancel or steer a reply
    half-way. Once ``responses`` are used up, a call raises :class:`ValueError`.

    Example::

        model = FakeToolCallingChatModel(
            responses=[
                AIMessage("", tool_calls=[{"name": "search", "args": {"q": "tides"}, "id": "call_1"}]),
                "The tides follow the moon.",
            ]
        )
        agent = create_agent(model, tools=[search])
    """

    responses: list[Reply] = Field(default_factory=list)
    """The replies, in order."""
    respond: Callable[[list[BaseMessage]], Reply] | None = None
    """Computes each reply from the conversation instead (``responses`` is then ignored)."""
    sleep: float | None = None
    """Seconds to wait before each streamed chunk."""
    i: int = 0
    """How many replies were given so far."""

    @property
    def _llm_type(self) -> str:
        return "fake-tool-calling-chat-model"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"responses": [r if isinstance(r, str) else r.model_dump() for r in self.responses]}

    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """The model with ``tools`` bound, as a real model does (``tool_choice`` is accepted and not enforced)."""
        return self.bind(tools=[convert_to_openai_tool(tool) for tool in tools], **kwargs)

    # -- replies ---------------------------------------------------------------------------------------------

    def _reply(self, messages: list[BaseMessage], tools: object) -> AIMessage:
        if self.respond is not None:
            reply = self.respond(messages)
        else:
            if self.i >= len(self.responses):
                raise ValueError(f"FakeToolCallingChatModel has no reply left: all {len(self.responses)} were given")
            reply = self.responses[self.i]
        self.i += 1
        message = AIMessage(reply) if isinstance(reply, str) else reply.model_copy(deep=True)
        counter = itertools.count(1)
        calls: list[ToolCall] = []
        for call in message.tool_calls:
            call_id = call.get("id") or f"call_{next(counter)}"
            calls.append({"name": call["name"], "args": call["args"], "id": call_id, "type": "tool_call"})
        message.tool_calls = calls
        if tools is not None and isinstance(tools, list):
            bound = {tool.get("function", {}).get("name") for tool in tools if isinstance(tool, dict)}
            unknown = [call["name"] for call in calls if call["name"] not in bound]
            if unknown:
                raise ValueError(f"scripted tool call to {unknown[0]!r}, which is not bound (bound: {sorted(bound)})")
        return message

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return ChatResult(generations=[ChatGeneration(message=self._reply(messages, kwargs.get("tools")))])

    def _chunks(self, message: AIMessage) -> Iterator[AIMessageChunk]:
        if isinstance(message.content, str):
            for token in _TOKEN.findall(message.content):
                yield AIMessageChunk(content=token, id=message.id)
        else:
            for index, block in enumerate(message.content):
                if isinstance(block, str):
                    block = {"type": "text", "text": block}
                key = {"text": "text", "reasoning": "reasoning", "thinking": "thinking"}.get(str(block.get("type")))
                text = block.get(key) if key is not None else None
                if key is None or not isinstance(text, str):
                    yield AIMessageChunk(content=[{**block, "index": index}], id=message.id)
                    continue
                for token in _TOKEN.findall(text):
                    yield AIMessageChunk(content=[{**block, key: token, "index": index}], id=message.id)
        for name, value in message.additional_kwargs.items():
            pieces = _TOKEN.findall(value) if isinstance(value, str) else [value]
            for piece in pieces:
                yield AIMessageChunk(content="", additional_kwargs={name: piece}, id=message.id)
        for index, call in enumerate(message.tool_calls):
            arguments = json.dumps(call["args"])
            pieces = [arguments[i : i + 8] for i in range(0, len(arguments), 8)] or [""]
            for n, piece in enumerate(pieces):
                first = n == 0
                chunk = tool_call_chunk(
                    name=call["name"] if first else None, args=piece, id=call["id"] if first else None, index=index
                )
                yield AIMessageChunk(content="", tool_call_chunks=[chunk], id=message.id)

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        message = self._reply(messages, kwargs.get("tools"))
        for chunk in self._chunks(message):
            if self.sleep is not None:
                time.sleep(self.sleep)
            yield ChatGenerationChunk(message=chunk)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        message = self._reply(messages, kwargs.get("tools"))
        for chunk in self._chunks(message):
            if self.sleep is not None:
                await asyncio.sleep(self.sleep)
            yield ChatGenerationChunk(message=chunk)
