"""Calls of one Lua script made in the same event-loop tick go out as one pipeline.

The reservation and rate-limit scripts run once or twice per request; sent one by
one, redis-py's per-command overhead (~100-200 us CPU: bench/bench_reserve.py,
bench/bench_routing.py) is most of their cost. The first call of a tick starts a
flush task that yields once, so the calls that become ready in the same tick join,
then sends them all: EVALSHA in a pipeline without MULTI (each script stays atomic
on its own and touches one user's slot, so this is valid on a Redis Cluster too,
where redis-py wants EVAL); a server that lost its scripts gets them loaded and the
calls sent again. A lone call is sent on its own (a pipeline costs more for one).

The sending is done by the task, not by the callers: a caller that stops waiting
(its budget, its client leaving) never cancels the others' calls, and `on_orphan`
learns the reply nobody took, so whatever the script reserved can be given back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

Call = tuple[list[Any], list[Any]]
Orphan = Callable[[Call, Any], None]


def _no_orphan(_call: Call, _reply: Any) -> None:
    return None


class ScriptBatcher:
    def __init__(
        self, redis: Any, script: Any, timeout_s: float, on_orphan: Orphan = _no_orphan
    ) -> None:
        self._redis = redis
        self._script = script  # redis-py Script (register_script)
        self._timeout = timeout_s
        self._on_orphan = on_orphan
        self._pending: list[tuple[Call, asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._cluster = isinstance(redis, RedisCluster)

    @property
    def pending(self) -> int:
        """Calls queued or in flight (tests wait for 0)."""
        return len(self._pending) + len(self._tasks)

    def submit(self, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """The call's reply, as a future (await it, add a callback, or leave it)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        fut.add_done_callback(_retrieve)
        self._pending.append(((list(keys), list(args)), fut))
        if len(self._pending) == 1:
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fut

    async def call(self, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """The reply; cancelled (the caller's timeout), it becomes an orphan's."""
        return await self.submit(keys, args)

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # this tick's other callers join
        batch, self._pending = self._pending, []
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._send([call for call, _ in batch])
        except Exception as exc:
            replies = [exc] * len(batch)
        except BaseException:  # cancelled (closing): nobody gets a reply
            for _, fut in batch:
                fut.cancel()
            raise
        for (call, fut), reply in zip(batch, replies, strict=True):
            if fut.done():
                self._on_orphan(call, reply)
            elif isinstance(reply, BaseException):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)

    async def _send(self, calls: list[Call]) -> list[Any]:
        if len(calls) == 1:
            keys, args = calls[0]
            try:
                return [await self._script(keys=keys, args=args)]
            except Exception as exc:  # handed to the caller
                return [exc]
        replies = await self._pipeline(calls)
        if any(isinstance(r, NoScriptError) for r in replies):
            await self._redis.script_load(self._script.script)
            replies = await self._pipeline(calls)
        return replies

    async def _pipeline(self, calls: list[Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            if self._cluster:
                # redis-py refuses EVALSHA in cluster pipelines; EVAL it is (Redis
                # caches the compiled body under its digest all the same).
                body = self._script.script
                for keys, args in calls:
                    pipe.eval(body, len(keys), *keys, *args)
            else:
                sha = self._script.sha
                for keys, args in calls:
                    pipe.evalsha(sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    async def aclose(self, wait_s: float = 2.0) -> None:
        """Let calls in progress finish for up to `wait_s`, then cancel them."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=wait_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # a reply nobody waits for any more is not an error to log
