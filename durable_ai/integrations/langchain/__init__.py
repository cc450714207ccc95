"""LangChain and LangGraph: stream an agent into a session in one line, stop it with a cancel, steer it.

Install with the ``langchain`` extra (``durable-ai[langchain]``: langchain-core 1.x; the steering middleware also
needs ``langchain`` 1.x)::

    async with session.run(agent="assistant") as run:
        await agent.ainvoke({"messages": [("user", "hi")]}, config={"callbacks": [run.langchain()]})

- :class:`DurableCallbackHandler` (``run.langchain()``) writes model text and reasoning as they stream, tool calls
  and results under LangChain's ids, handled errors, custom events, and the work of named nested agents as
  sub-agent runs. It runs inline, under the run's cancel scope, so a cancel stops the model call; it works from
  sync code too (``.invoke()`` in a worker thread), handing each write to the run's event loop. Its bridges,
  :meth:`~DurableCallbackHandler.relay_events` and :meth:`~DurableCallbackHandler.relay_graph`, write
  ``astream_events`` and LangGraph ``astream`` parts for code that streams instead.
- Steering: :class:`SteeringMiddleware` (interrupts the model on a steer) and :class:`StepSteeringMiddleware`
  (applies steers between steps) for ``create_agent``; :func:`steerable` and :func:`drain_steers` for LCEL and
  LangGraph loops.
- :class:`FakeToolCallingChatModel`: a scripted chat model that streams text, reasoning and tool calls and binds
  tools, to test agents offline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    import langchain_core  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on what is installed
    raise ImportError(
        "durable_ai.integrations.langchain needs langchain-core: install the extra, pip install 'durable-ai[langchain]'"
    ) from exc

from ._engine import DeliveryError, SubAgentFailed
from ._fake import FakeToolCallingChatModel
from ._handler import DurableCallbackHandler
from ._steering import Steered, drain_steers, next_steer, steerable

if TYPE_CHECKING:
    from .middleware import SteeringMiddleware, StepSteeringMiddleware

__all__ = [
    "DeliveryError",
    "DurableCallbackHandler",
    "FakeToolCallingChatModel",
    "Steered",
    "SteeringMiddleware",
    "StepSteeringMiddleware",
    "SubAgentFailed",
    "drain_steers",
    "next_steer",
    "steerable",
]

_MIDDLEWARE = frozenset({"SteeringMiddleware", "StepSteeringMiddleware"})


def __getattr__(name: str) -> Any:
    # The middleware needs the langchain package (not only langchain-core): imported when it is asked for.
    if name in _MIDDLEWARE:
        try:
            from . import middleware
        except ImportError as exc:
            raise ImportError(f"{name} needs langchain 1.x: pip install 'langchain>=1,<2'") from exc
        return getattr(middleware, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
