"""Reading a Redis subscription that may fall silent.

A partition leaves a subscription's socket open and silent: no error ever
comes, and no message either. So a subscription quiet for `silence_s` is
pinged, and one that does not answer within another `silence_s` is given up
(ConnectionError), for the caller to subscribe again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from redis.asyncio.client import PubSub


async def receive(
    pubsub: PubSub, silence_s: float, on_message: Callable[[bytes | str, bytes | str], None]
) -> None:
    """Hand each message's channel and data to `on_message` until the subscription
    fails or falls silent past a ping."""
    loop = asyncio.get_running_loop()
    heard = loop.time()
    pinged = False
    while True:
        message = await pubsub.get_message(timeout=silence_s)
        if message is not None:
            heard, pinged = loop.time(), False
            if message.get("type") == "message":
                on_message(message["channel"], message["data"])
        elif loop.time() - heard >= 2 * silence_s and pinged:
            raise ConnectionError(f"no answer to a ping for {silence_s:g} s")
        elif loop.time() - heard >= silence_s and not pinged:
            await pubsub.ping()
            pinged = True
