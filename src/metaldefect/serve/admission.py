"""Bounded concurrency for inference: at most N detections run at once, at most Q wait.

A request beyond that is refused at once with 503 and ``Retry-After`` rather than piling
up: each waiting request holds its upload in memory, and a line station would rather be
told to retry than wait minutes. Used from one event loop only, so the counters need no lock.
"""
from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import HTTPException


class Admission:
    """``async with admission.slot(): ...`` runs the body when one of ``max_running`` slots is free."""

    def __init__(self, max_running: int, max_waiting: int):
        if max_running < 1:
            raise ValueError(f"max_running {max_running}: expected at least 1")
        if max_waiting < 0:
            raise ValueError(f"max_waiting {max_waiting}: expected 0 or more")
        self.max_running = max_running
        self.max_waiting = max_waiting
        self.running = 0
        self.waiting = 0
        self._semaphore: asyncio.Semaphore | None = None  # made in the serving loop, on first use

    def refuse_if_full(self) -> None:
        """503 when every slot and queue place is taken (also worth asking before reading an upload)."""
        if self.running + self.waiting >= self.max_running + self.max_waiting:
            raise HTTPException(503, f"busy: {self.running} detections running and {self.waiting} waiting "
                                     "(the server's --concurrency and --queue limits); retry shortly",
                                headers={"Retry-After": "1"})

    @asynccontextmanager
    async def slot(self):
        self.refuse_if_full()
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_running)
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1
        try:
            yield
        finally:
            self.running -= 1
            self._semaphore.release()
