"""The ``durable-ai`` command.

- ``durable-ai check URL``: run the durable-session checks against a backend and print a scorecard.
- ``durable-ai tail URL SESSION [--after CURSOR]``: follow a session, one line per event with its cursor.
- ``durable-ai schema``: print the JSON Schema of the wire vocabulary.
- ``durable-ai demo [--backend URL] [--host HOST] [--port PORT] [--tokens-per-second N] [--tokens N]``: serve the
  demo app (:func:`durable_ai.demo.create_app`: a chat page at ``/``, a scripted agent behind the Vercel AI SDK chat
  routes and the native gateway) with uvicorn. Needs the ``demo`` extra: ``pip install 'durable-ai[demo]'``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Sequence
from typing import TextIO

from .backend import backend_from_url
from .errors import BackendUnavailable, DurableAIError
from .events import Event, control_schema, event_schema
from .hub import Hub, connect

__all__ = ["main"]

logger = logging.getLogger("durable_ai")


def _out(stream: TextIO, line: str = "") -> None:
    stream.write(line + "\n")
    stream.flush()


async def _check(url: str, only: Sequence[str], stream: TextIO) -> int:
    from .testing.scenarios import CHECKS, CheckFailed, CheckSkipped
    from .testing.targets import target_for_url

    backend_from_url(url)  # an unknown scheme or a bad option fails here, once, with what to install
    target = target_for_url(url)
    names = [name for name in CHECKS if not only or any(o in name for o in only)]
    if not names:
        _out(stream, f"no check matches {' '.join(only)!r}; checks: {', '.join(CHECKS)}")
        return 2
    _out(stream, f"durable-ai check {url}")
    probe = target.backend()
    try:
        await probe.open()
    except BackendUnavailable as exc:
        _out(stream, f"cannot reach the broker: {exc}")
        return 2
    await probe.close()
    passed = failed = 0
    width = max(len(name) for name in names) + 2
    for name in names:
        started = time.perf_counter()
        try:
            detail = await CHECKS[name](target)
            verdict = "PASS"
            passed += 1
        except CheckSkipped as exc:
            verdict, detail = "SKIP", str(exc)
        except CheckFailed as exc:
            verdict, detail = "FAIL", str(exc)
            failed += 1
        except (DurableAIError, OSError) as exc:
            verdict, detail = "FAIL", f"{type(exc).__name__}: {exc}"
            failed += 1
        elapsed = (time.perf_counter() - started) * 1000
        _out(stream, f"  {verdict}  {name:<{width}}{elapsed:8.1f} ms  {detail}")
    total = passed + failed
    _out(stream, f"{passed}/{total} checks passed" + ("" if not failed else f", {failed} failed"))
    return 0 if failed == 0 and passed > 0 else 1


def _describe(event: Event) -> str:
    fields = event.model_dump(exclude={"v", "id", "type", "session", "run_id", "agent", "ts"}, exclude_none=True)
    text = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    return text if len(text) <= 160 else text[:157] + "..."


async def print_events(hub: Hub, session_id: str, after: str | None, follow: bool, stream: TextIO) -> None:
    """Print a session's events, one line each: cursor, type, agent, fields."""
    async with hub.session(session_id).events(after=after, follow=follow) as events:
        async for event in events:
            who = event.agent or "-"
            _out(stream, f"{event.cursor}  {event.type:<15} {who:<12} {_describe(event)}")


async def _tail(url: str, session_id: str, after: str | None, follow: bool, stream: TextIO) -> int:
    async with connect(url) as hub:
        await print_events(hub, session_id, after, follow, stream)
    return 0


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def _demo(backend: str, host: str, port: int, tokens_per_second: float, tokens: int) -> int:
    from .demo import create_app

    try:
        import uvicorn  # noqa: F401  (the server below)

        from .integrations.starlette import uvicorn_server

        app = create_app(backend, tokens_per_second=tokens_per_second, tokens=tokens)  # imports Starlette
    except ImportError as exc:
        sys.stderr.write(
            f"durable-ai demo needs the 'demo' extra (Starlette and uvicorn): pip install 'durable-ai[demo]' ({exc})\n"
        )
        return 2
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    where = f"[{host}]" if ":" in host else host
    logger.info(
        "durable-ai demo: open http://%s:%d/ (chat: /api/chat, gateway: /sessions), backend %s, %g tokens/s",
        where,
        port,
        backend,
        tokens_per_second,
    )
    server = uvicorn_server(app, app.state.durable, host=host, port=port, ws_ping_interval=20, ws_ping_timeout=20)
    server.run()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="durable-ai", description="Durable sessions for AI chat and agent streams.")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("check", help="check a backend: resume, join, cancel, ordering, no loss")
    check.add_argument("url", help="backend URL, e.g. memory:// or nats://127.0.0.1:4222")
    check.add_argument("--only", nargs="*", default=[], help="run only the checks whose names contain these words")
    tail = commands.add_parser("tail", help="print a session's events with their cursors")
    tail.add_argument("url")
    tail.add_argument("session")
    tail.add_argument("--after", default=None, help="start after this cursor (default: from the start)")
    tail.add_argument("--no-follow", action="store_true", help="stop at the end instead of following live")
    schema = commands.add_parser("schema", help="print the JSON Schema of events and controls")
    schema.add_argument("which", nargs="?", choices=["events", "controls"], default="events")
    demo = commands.add_parser(
        "demo", help="serve a chat page and a scripted agent behind the chat routes and the gateway"
    )
    demo.add_argument("--backend", default="memory://", help="backend URL (default: memory://)")
    demo.add_argument("--host", default="127.0.0.1", help="interface to listen on (default: 127.0.0.1)")
    demo.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    demo.add_argument(
        "--tokens-per-second", type=_positive, default=50.0, help="pace of the scripted answers (default: 50)"
    )
    demo.add_argument("--tokens", type=_count, default=320, help="text deltas in each answer (default: 320)")
    return parser


def main(argv: Sequence[str] | None = None, stream: TextIO | None = None) -> int:
    """Run the command line; returns the exit status."""
    args = _parser().parse_args(argv)
    out = stream or sys.stdout
    try:
        if args.command == "check":
            return asyncio.run(_check(args.url, args.only, out))
        if args.command == "tail":
            return asyncio.run(_tail(args.url, args.session, args.after, not args.no_follow, out))
        if args.command == "demo":
            return _demo(args.backend, args.host, args.port, args.tokens_per_second, args.tokens)
        schema = event_schema() if args.which == "events" else control_schema()
        _out(out, json.dumps(schema, indent=2))
        return 0
    except DurableAIError as exc:
        sys.stderr.write(f"durable-ai: {exc}\n")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
