"""Group concurrent calls into one round trip: the request-id ledger's etcd lookups and
creates (``kms.requests``) and the trust-bundle service's repository reads (``kms.tuf.store``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

from kms.errors import Unavailable

A = TypeVar("A")
R = TypeVar("R")
MAX_GROUP = 128  # etcd's default --max-txn-ops


class Coalescer(Generic[A, R]):
    """Runs ``flush(group)`` for the arguments of concurrent calls, one group at a time: calls
    made while a group is in flight wait for the next one (at most ``MAX_GROUP`` each), so under
    load one etcd round trip serves many requests, and a lone call still goes at once. Each
    caller gets its own result, or the group's exception.

    ``linger(queued)``, if given, is asked when a call finds nothing in flight: the seconds
    to wait for more calls before the first group goes (it goes early once ``MAX_GROUP`` are
    queued); 0 sends it at once."""

    def __init__(self, flush: Callable[[list[A]], Awaitable[list[R]]], name: str, *,
                 linger: Callable[[int], float] | None = None,
                 stopped: str = "stopped") -> None:
        self._flush = flush
        self._stopped = stopped
        self._name = name
        self._linger = linger
        self._queue: list[tuple[A, asyncio.Future[R]]] = []
        self._draining: asyncio.Task[None] | None = None
        self._full = asyncio.Event()

    async def __call__(self, argument: A) -> R:
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((argument, future))
        if len(self._queue) >= MAX_GROUP:
            self._full.set()
        if self._draining is None:
            self._draining = asyncio.get_running_loop().create_task(
                self._drain(), name=self._name)
        return await future

    async def _drain(self) -> None:
        try:
            wait = self._linger(len(self._queue)) if self._linger is not None else 0.0
            if wait > 0 and len(self._queue) < MAX_GROUP:
                self._full.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._full.wait()
            while self._queue:
                group = [(argument, future) for argument, future in self._queue[:MAX_GROUP]
                         if not future.done()]  # callers that gave up are skipped
                del self._queue[:MAX_GROUP]
                if group:
                    await self._answer(group)
        finally:
            self._draining = None
            _fail(self._queue, Unavailable(self._stopped))  # cancelled only
            self._queue.clear()

    async def _answer(self, group: list[tuple[A, asyncio.Future[R]]]) -> None:
        try:
            results = await self._flush([argument for argument, _ in group])
        except Exception as error:  # each caller gets the group's failure
            _fail(group, error)
            return
        except BaseException:  # cancelled (loop shutdown): nobody may wait forever
            _fail(group, Unavailable(self._stopped))
            raise
        for (_, future), result in zip(group, results, strict=True):
            if not future.done():
                future.set_result(result)


def _fail(waiting: list[tuple[Any, asyncio.Future[Any]]], error: Exception) -> None:
    for _, future in waiting:
        if not future.done():
            future.set_exception(error)
