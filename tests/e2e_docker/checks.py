"""What every step of the container end-to-end scenario uses: the namespace, a check that
logs what it confirmed or fails the scenario saying what did not hold, and a deadline poll."""

from __future__ import annotations

import asyncio
import logging
import time

NS = "default"
log = logging.getLogger("e2e")


class Failed(Exception):
    pass


def check(ok: bool, what: str) -> None:
    if not ok:
        raise Failed(what)
    log.info("ok: %s", what)


async def wait_for(probe, *, timeout: float, what: str, interval: float = 1.0):
    deadline = time.monotonic() + timeout
    while True:
        value = await probe() if asyncio.iscoroutinefunction(probe) else probe()
        if value:
            return value
        if time.monotonic() > deadline:
            raise Failed(f"timed out after {timeout:.0f} s waiting for {what} (last: {value!r})")
        await asyncio.sleep(interval)
