"""Run the Ably emulator until interrupted: ``python -m durable_ai_ably.testing [--port 8765] [--appends]``.

It prints the ``ably://`` URL that reaches it, for ``durable-ai check`` or an application under test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys

from durable_ai_ably.testing.emulator import AblyEmulator

DEFAULT_KEY = "local.key:secret"


async def _serve(port: int, key: str, mutable: list[str]) -> None:
    async with AblyEmulator({key: None}, port=port, mutable_namespaces=mutable) as emulator:
        sys.stdout.write(
            f"Ably emulator on 127.0.0.1:{emulator.port}"
            f"{' (appends on: ' + ', '.join(mutable) + ')' if mutable else ''}\n"
            f"  ably://?key={key}&endpoint={emulator.endpoint}&tls=false\n"
        )
        sys.stdout.flush()
        await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m durable_ai_ably.testing", description=__doc__)
    parser.add_argument("--port", type=int, default=8765, help="loopback port (0: any free one); default 8765")
    parser.add_argument("--key", default=DEFAULT_KEY, help=f"the API key it accepts; default {DEFAULT_KEY}")
    parser.add_argument(
        "--appends",
        action="append",
        nargs="?",
        const="ai",
        default=[],
        metavar="NAMESPACE",
        help="give NAMESPACE (default ai) the 'updates, deletes and appends' channel rule; repeatable",
    )
    args = parser.parse_args(argv)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.port, args.key, args.appends))


if __name__ == "__main__":
    main()
