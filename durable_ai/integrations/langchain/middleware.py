"""Steering middleware for ``langchain.agents.create_agent`` (langchain 1.x; needs the ``langchain`` package).

::

    agent = create_agent(model, tools, middleware=[SteeringMiddleware()])
    await agent.ainvoke({"messages": [...]}, config={"callbacks": [run.langchain()]})

Without a run, a middleware steers the run whose handler (``run.langchain()``) the call carries, so one agent
serves every run; pass ``SteeringMiddleware(run)`` to name the run yourself.

- :class:`SteeringMiddleware` interrupts the model when a steer arrives: the model call is cancelled (what it
  streamed stays in the run), the steer is added to the conversation as a user message, and the model answers
  again. Steers that arrive while tools run are added before the next model call.
- :class:`StepSteeringMiddleware` never interrupts: it adds the steers that arrived before each model call.

Both record the steers in the agent's state (``messages``), so a checkpointed thread keeps them. Interruption
needs the async path (``ainvoke``/``astream``); from sync code (``invoke`` in a worker thread), both add steers
between steps.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, cast

from langchain.agents.middleware import AgentMiddleware, AgentState, ModelRequest, ModelResponse
from langchain_core.callbacks import BaseCallbackManager
from langchain_core.messages import AnyMessage, BaseMessage, HumanMessage
from langgraph.config import get_config
from langgraph.runtime import Runtime

from ...errors import ConfigurationError
from ...run import Run
from ._handler import DurableCallbackHandler, call_on_loop
from ._steering import drain_steers, steerable

__all__ = ["SteeringMiddleware", "StepSteeringMiddleware"]


class _RunSteering(AgentMiddleware[AgentState[Any], Any, Any]):
    def __init__(self, run: Run | None = None, *, handoff_timeout: float = 5.0) -> None:
        super().__init__()
        self.run = run
        """The run whose steers it applies; ``None``: the run of the handler the call carries."""
        self.handoff_timeout = handoff_timeout

    def _run(self) -> Run:
        if self.run is not None:
            return self.run
        callbacks = get_config().get("callbacks")
        handlers = callbacks.handlers if isinstance(callbacks, BaseCallbackManager) else callbacks or []
        for handler in handlers:
            if isinstance(handler, DurableCallbackHandler):
                return handler.run
        raise ConfigurationError(
            f"{type(self).__name__}() steers the run whose handler the call carries, and this call has none: "
            'pass config={"callbacks": [run.langchain()]}, or give the middleware its run'
        )

    def _drain_from_thread(self) -> list[HumanMessage]:
        """The waiting steers, taken on the run's loop (an inbox belongs to its loop)."""
        run = self._run()
        if not run.active or run.task is None:
            return []
        loop = run.task.get_loop()
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_loop = False
        if on_loop:  # sync code on the run's own loop: the inbox can be read right here
            return drain_steers(run)

        async def drain() -> list[HumanMessage]:
            return drain_steers(run)

        return call_on_loop(loop, drain, timeout=self.handoff_timeout)


class StepSteeringMiddleware(_RunSteering):
    """Adds the steers addressed to ``run`` to the conversation before each model call, as user messages."""

    async def abefore_model(self, state: AgentState[Any], runtime: Runtime[Any]) -> dict[str, Any] | None:
        steers = drain_steers(self._run())
        return {"messages": steers} if steers else None

    def before_model(self, state: AgentState[Any], runtime: Runtime[Any]) -> dict[str, Any] | None:
        steers = self._drain_from_thread()
        return {"messages": steers} if steers else None


class SteeringMiddleware(_RunSteering):
    """Interrupts the model on a steer addressed to ``run``, adds the steer to the conversation, and goes on."""

    async def awrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], Awaitable[ModelResponse[Any]]],
    ) -> ModelResponse[Any]:
        async def call(messages: list[BaseMessage]) -> ModelResponse[Any]:
            return await handler(request.override(messages=cast("list[AnyMessage]", messages)))

        steered = await steerable(self._run(), call, request.messages)
        response = steered.result
        return ModelResponse(
            result=[*steered.steers, *response.result], structured_response=response.structured_response
        )

    def wrap_model_call(
        self,
        request: ModelRequest[Any],
        handler: Callable[[ModelRequest[Any]], ModelResponse[Any]],
    ) -> ModelResponse[Any]:
        steers = self._drain_from_thread()
        if not steers:
            return handler(request)
        response = handler(request.override(messages=[*request.messages, *steers]))
        return ModelResponse(result=[*steers, *response.result], structured_response=response.structured_response)
