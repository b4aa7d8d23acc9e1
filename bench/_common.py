"""Small helpers shared by the bench servers and the harness."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

MAX_MESSAGE_BYTES = 256 * 1024 * 1024

# Options shared by every bench server and channel: TF Serving traffic exceeds
# gRPC's 4 MiB default.
MESSAGE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


def write_port_file(path: str | os.PathLike[str], ports: dict[str, int]) -> None:
    """Write ``ports`` as JSON atomically, so a poller never reads half a file.

    The same format as guard.control.process.write_port_file; the bench's
    servers (the passthrough anchor among them) must not import the guard.
    """
    target = Path(path)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(ports))
    tmp.replace(target)


def read_port_file(path: str | os.PathLike[str]) -> dict[str, int] | None:
    """Return the ports in ``path`` (a JSON object), or None until written."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        return None
    # Ports only: a --workers supervisor also lists its workers' pids.
    return {str(k): int(v) for k, v in data.items() if isinstance(v, int)}


async def serve_until_signal(stop: Callable[[], Awaitable[None]]) -> None:
    """Wait for SIGINT/SIGTERM, then run ``stop``."""
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await stop()


def install_uvloop() -> bool:
    """Make uvloop the event loop policy if it is installed; return whether it is."""
    try:
        import uvloop
    except ImportError:
        return False
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return True
