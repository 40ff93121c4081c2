"""Calls of one Lua script made in the same event-loop tick go out as one command.

The reservation and rate-limit scripts run once or twice per request; sent one by
one, redis-py's per-command overhead (packing, the connection's retry and timeout
wrappers, parsing: ~100-200 us CPU, bench/bench_reserve.py, bench/bench_routing.py)
is most of their cost. The first call of a tick starts a flush task that yields
once, so the calls that become ready in the same tick join, then sends them all as
ONE EVALSHA of a wrapper script: the script's body as a function, run once per call
with that call's KEYS and ARGV (each call under `pcall`, so one call's error is its
own reply), the replies returned as one array. A lone call is sent as the script
itself. The batch runs atomically as a whole (each call did on its own before: it
still does). On a Redis Cluster every call touches one user's slot; the calls are
grouped by slot, one wrapper call per slot, the groups sent concurrently. A server
that lost its scripts gets them loaded and the calls sent again (redis-py's Script).

The body must not start with a shebang line (`#!lua flags=...`): it becomes a
function body. Every call names at least one key (the slot is its first key's).

The sending is done by the task, not by the callers: a caller that stops waiting
(its budget, its client leaving) never cancels the others' calls, and `on_orphan`
learns the reply nobody took, so whatever the script reserved can be given back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ResponseError

from proxy.billing import redis_raw

Call = tuple[list[Any], list[Any]]
Orphan = Callable[[Call, Any], None]

# ARGV[1]: the number of calls m; ARGV[2 .. 2m+1]: each call's (number of keys,
# number of args); then every call's args, in order. KEYS: every call's keys.
_MULTI_TAIL = """
local m = tonumber(ARGV[1])
local ki, ai = 1, 2 + 2 * m
local out = {}
for c = 1, m do
  local nk, na = tonumber(ARGV[2 * c]), tonumber(ARGV[2 * c + 1])
  local ks, as = {}, {}
  for i = 1, nk do ks[i] = KEYS[ki + i - 1] end
  for i = 1, na do as[i] = ARGV[ai + i - 1] end
  ki, ai = ki + nk, ai + na
  local ok, r = pcall(one, ks, as)
  if not ok then
    if type(r) == 'table' and r.err then out[c] = r else out[c] = {err = tostring(r)} end
  elseif r == nil then
    out[c] = false
  else
    out[c] = r
  end
end
return out
"""


def multi_body(body: str) -> str:
    """The wrapper script that runs `body` once per call (see the module's doc)."""
    return "local function one(KEYS, ARGV)\n" + body + "\nend\n" + _MULTI_TAIL


def _no_orphan(_call: Call, _reply: Any) -> None:
    return None


class ScriptBatcher:
    def __init__(
        self, redis: Any, script: Any, timeout_s: float, on_orphan: Orphan = _no_orphan
    ) -> None:
        self._redis = redis
        self._script = script  # redis-py Script (register_script)
        self._multi = redis.register_script(multi_body(script.script))
        self._timeout = timeout_s
        self._on_orphan = on_orphan
        self._pending: list[tuple[Call, asyncio.Future[Any]]] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._cluster = isinstance(redis, RedisCluster)

    @property
    def scripts(self) -> tuple[Any, Any]:
        """The script and its wrapper (to load them ahead of the first call)."""
        return self._script, self._multi

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
                if self._cluster:
                    return [await self._script(keys=keys, args=args)]
                return [await redis_raw.evalsha(self._redis, self._script, keys, args)]
            except Exception as exc:  # handed to the caller
                return [exc]
        if not self._cluster:
            return await self._send_multi(calls)
        slots: dict[int, list[int]] = {}
        for i, (keys, _) in enumerate(calls):
            slot = key_slot(keys[0].encode() if isinstance(keys[0], str) else keys[0])
            slots.setdefault(slot, []).append(i)
        if len(slots) == 1:
            return await self._send_multi(calls)
        groups = list(slots.values())
        results = await asyncio.gather(
            *(self._send([calls[i] for i in group]) for group in groups), return_exceptions=True
        )
        replies: list[Any] = [None] * len(calls)
        for group, result in zip(groups, results, strict=True):
            for n, i in enumerate(group):
                replies[i] = result if isinstance(result, BaseException) else result[n]
        return replies

    async def _send_multi(self, calls: list[Call]) -> list[Any]:
        """One wrapper call for `calls` (one slot); a failure of the whole call is
        every call's reply."""
        counts: list[Any] = [len(calls)]
        keys: list[Any] = []
        args: list[Any] = []
        for k, a in calls:
            counts.append(len(k))
            counts.append(len(a))
            keys.extend(k)
            args.extend(a)
        try:
            if self._cluster:
                replies = await self._multi(keys=keys, args=counts + args)
            else:  # packed here: redis-py's per-argument packing was most of the cost
                replies = await redis_raw.evalsha(self._redis, self._multi, keys, counts + args)
        except Exception as exc:
            return [exc] * len(calls)
        if not isinstance(replies, list) or len(replies) != len(calls):
            return [ResponseError(f"unexpected batch reply: {replies!r:.80}")] * len(calls)
        return replies

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
