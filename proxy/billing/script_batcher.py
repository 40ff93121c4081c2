"""Calls of one Lua script made in the same event-loop tick go out as one pipeline.

The reservations' scripts run once or twice per request; sent one by one, redis-py's
per-command overhead is most of their CPU cost (bench/bench_reserve.py). The first
call of a tick starts a flush task that yields once, so the calls that become ready
in the same tick join, then sends them all (EVALSHA in a pipeline without MULTI:
each call touches one user's slot, so it is valid on a Redis Cluster too; a server
that lost its scripts gets them loaded and the calls sent again). A lone call is
sent on its own (a pipeline costs more for one command).

A caller that stops waiting (its budget, its client leaving) does not stop its call:
it is sent with the rest, and its reply dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

_Call = tuple[Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    def __init__(self, redis: Any, script: Any, timeout_s: float) -> None:
        self._redis = redis
        self._script = script  # redis-py Script (register_script)
        self._timeout = timeout_s
        self._pending: list[_Call] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._cluster = isinstance(redis, RedisCluster)

    def submit(self, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """The call's reply, as a future (await it, or leave it: nobody must)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        fut.add_done_callback(_retrieve)
        self._pending.append((keys, args, fut))
        if len(self._pending) == 1:
            task = loop.create_task(self._flush())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return fut

    async def _flush(self) -> None:
        await asyncio.sleep(0)  # this tick's other callers join
        batch, self._pending = self._pending, []
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._send(batch)
        except BaseException as exc:
            for _, _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc if isinstance(exc, Exception) else TimeoutError())
            if not isinstance(exc, Exception):
                raise
            return
        for (_, _, fut), reply in zip(batch, replies, strict=True):
            if not fut.done():
                if isinstance(reply, Exception):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    async def _send(self, batch: list[_Call]) -> list[Any]:
        if len(batch) == 1:
            keys, args, _ = batch[0]
            try:
                return [await self._script(keys=list(keys), args=list(args))]
            except Exception as exc:  # handed to the caller
                return [exc]
        replies = await self._pipeline(batch)
        if any(isinstance(r, NoScriptError) for r in replies):
            await self._redis.script_load(self._script.script)
            replies = await self._pipeline(batch)
        return replies

    async def _pipeline(self, batch: list[_Call]) -> list[Any]:
        async with self._redis.pipeline(transaction=False) as pipe:
            if self._cluster:
                # redis-py refuses EVALSHA in cluster pipelines; EVAL it is (Redis
                # caches the compiled body under its digest all the same).
                body = self._script.script
                for keys, args, _ in batch:
                    pipe.eval(body, len(keys), *keys, *args)
            else:
                sha = self._script.sha
                for keys, args, _ in batch:
                    pipe.evalsha(sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    async def aclose(self, wait_s: float) -> None:
        """Let calls in progress finish for up to `wait_s`, then cancel them."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=wait_s)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


def _retrieve(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()  # a reply nobody waits for any more is not an error to log
