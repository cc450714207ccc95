"""Steering for LangChain code: a client's steer becomes a user message of the conversation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from langchain_core.messages import BaseMessage, HumanMessage

from ...backends.kit import cancel_and_wait
from ...inbox import SteerMessage
from ...run import Run

__all__ = ["Steered", "drain_steers", "next_steer", "steerable"]

T = TypeVar("T")


def steer_message(steer: SteerMessage) -> HumanMessage:
    """A steer as the user message it is (its id is the ``user-message`` the session recorded)."""
    return HumanMessage(steer.text, id=steer.message_id)


def drain_steers(run: Run) -> list[HumanMessage]:
    """The steers waiting in ``run``'s inbox, as user messages to append to the conversation (without waiting).

    Call it between the steps of a loop: ``messages += drain_steers(run)`` before each model call.
    """
    return [steer_message(steer) for steer in run.inbox.drain()]


async def next_steer(run: Run) -> SteerMessage | None:
    """Wait for the next steer addressed to ``run``; ``None`` once the run has ended."""
    iterator = run.steering()
    try:
        return await anext(iterator, None)
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


@dataclass
class Steered(Generic[T]):
    """What :func:`steerable` returns: the call's ``result``, the conversation it answered (``messages``) and the
    user messages that steers added to it (``steers``, also at the end of ``messages``, in order)."""

    result: T
    messages: list[BaseMessage]
    steers: list[HumanMessage] = field(default_factory=list)


async def steerable(
    run: Run, call: Callable[[list[BaseMessage]], Awaitable[T]], messages: Sequence[BaseMessage]
) -> Steered[T]:
    """``await call(messages)``, interrupted by steers: the generic helper for LCEL and LangGraph loops.

    Steers already waiting are appended first. While the call runs, a steer cancels it (what it streamed so far
    stays in the run), is appended to the conversation as a user message, and the call starts again on the new
    conversation. A user's "actually, use TypeScript" changes the rest of the answer::

        steered = await steerable(run, lambda messages: model.ainvoke(messages, config), history)
        history = [*steered.messages, steered.result]
    """
    conversation = list(messages)
    added: list[HumanMessage] = []
    while True:
        waiting = drain_steers(run)
        conversation += waiting
        added += waiting
        answer = asyncio.create_task(_result(call(list(conversation))))
        steer = asyncio.create_task(next_steer(run))
        try:
            await asyncio.wait({answer, steer}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:  # the run is cancelled: so is the call
            answer.cancel()
            steer.cancel()
            await asyncio.wait({answer, steer})
            _retrieve(answer, steer)
            raise
        if not steer.done():
            await cancel_and_wait(steer)  # nothing is lost: a steer is taken from the inbox only when it is returned
        taken = None if steer.cancelled() else steer.result()
        if taken is None:
            return Steered(await answer, conversation, added)
        if answer.done():
            _retrieve(answer)  # it finished as the steer came: the steered answer replaces it
        else:
            await cancel_and_wait(answer)
        message = steer_message(taken)
        conversation.append(message)
        added.append(message)


async def _result(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _retrieve(*tasks: asyncio.Task[object] | asyncio.Task[T] | asyncio.Task[SteerMessage | None]) -> None:
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()
