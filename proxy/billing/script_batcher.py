"""Calls of Lua scripts made in the same event-loop tick go out as few commands.

The reservation and rate-limit scripts run twice each per request (admit/reserve,
then finish/settle); sent one by one, the per-command overhead (packing, a round
trip through the loop, parsing) is most of their cost. One `ScriptBus` per Redis
client carries every registered script: the first call of a tick schedules a flush
two loop rounds later (so that the calls which become ready meanwhile join), which
sends them, up to `MAX_CALLS` at a time (the commands pipelined), each group as ONE
EVALSHA of a wrapper script: each script's body as a function, run once per call
with that call's KEYS and ARGV (each call under `pcall`, so one call's error is its
own reply), the replies returned as one array. A lone call is sent as its script
itself. A batch runs atomically as a whole
(each call did on its own before: it still does). Calls of different scripts
share a batch: a request's settle and its rate-limit finish, made in the same tick,
are one command with the other requests' admissions.

On one node the batch is packed in C and written on one pipelined connection
(proxy.billing.redis_raw): no task, no pool checkout per batch, the reply
dispatched from the reader. On a Redis Cluster every call touches one user's slot;
the calls are grouped by slot, one wrapper call per slot through redis-py, the
groups sent concurrently. A server that lost its scripts gets them loaded and the
batch sent again; a connection that broke is tried once more on a new one (as
redis-py's default retry did).

A body must not start with a shebang line (`#!lua flags=...`): it becomes a
function body. Every call names at least one key (the slot is its first key's).

A caller that stops waiting (its budget, its client leaving) never cancels the
others' calls, and `on_orphan` learns the reply nobody took, so whatever the script
reserved can be given back.

Two registered scripts can also be chained (`ScriptBus.chain`): one call runs the
first and, when its reply's first element is one of `when`, the second, in the same
script call (atomically: a request's reservation and its rate-limit admission are
one call, not two made one after the other, each its own round trip).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from proxy.billing.redis_raw import (
    KeyPacker,
    PipeReset,
    RedisPipe,
    bulk_count,
    bulk_items,
    evalsha,
    evalsha_head,
)
from proxy.contract.records import record

log = logging.getLogger(__name__)

Call = tuple[list[Any], list[Any]]
Orphan = Callable[[Call, Any], None]

# At most this many calls in one command (one node). A tick's calls as ONE script
# call made every request of the tick wait for all of them (Redis runs a batch as a
# whole, ~40 us a call): at saturation the proxy sat idle ~15 % of the time
# waiting for such replies. Pipelined in smaller commands, the first replies come
# back while Redis runs the rest (bench: the proxy's core 85 % -> 99 % busy, ~+15 %
# requests/s with 64 connections; chunks of 3 to 8 alike).
MAX_CALLS = 8

# ARGV[1]: the number of calls m; ARGV[2 .. 3m+1]: each call's (function, number of
# keys, number of args); then every call's args, in order. KEYS: every call's keys.
_MULTI_TAIL = """
local m = tonumber(ARGV[1])
local ki, ai = 1, 2 + 3 * m
local out = {}
for c = 1, m do
  local f = F[tonumber(ARGV[3 * c - 1])]
  local nk, na = tonumber(ARGV[3 * c]), tonumber(ARGV[3 * c + 1])
  local ks, as = {}, {}
  for i = 1, nk do ks[i] = KEYS[ki + i - 1] end
  for i = 1, na do as[i] = ARGV[ai + i - 1] end
  ki, ai = ki + nk, ai + na
  local ok, r = pcall(f, ks, as)
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


def multi_body(bodies: Sequence[str]) -> str:
    """The wrapper script that runs each call's body (see the module's doc)."""
    parts = ["local F = {}\n"]
    for i, body in enumerate(bodies, 1):
        parts.append(f"F[{i}] = function(KEYS, ARGV)\n{body}\nend\n")
    return "".join(parts) + _MULTI_TAIL


# A chain of two bodies F1, F2. ARGV[1]: "<keys of the first> <args of the first>",
# then the first's args, then the second's; KEYS: the first's, then the second's.
# Returns {first's reply} or, when it started with one of W's, {first's, second's}
# (the second under pcall: its error is its own, the first's writes stand).
_CHAIN_TAIL = """
local nk, na = string.match(ARGV[1], '^(%d+) (%d+)$')
nk, na = tonumber(nk), tonumber(na)
local k1, a1, k2, a2 = {}, {}, {}, {}
for i = 1, #KEYS do
  if i <= nk then k1[i] = KEYS[i] else k2[i - nk] = KEYS[i] end
end
for i = 2, #ARGV do
  if i <= na + 1 then a1[i - 1] = ARGV[i] else a2[i - na - 1] = ARGV[i] end
end
local r = F1(k1, a1)
if type(r) ~= 'table' or not W[r[1]] then return {r} end
local ok, r2 = pcall(F2, k2, a2)
if not ok then
  if type(r2) == 'table' and r2.err then return {r, r2} end
  return {r, {err = tostring(r2)}}
end
if r2 == nil then r2 = false end
return {r, r2}
"""


def chain_body(first: str, second: str, when: Sequence[int]) -> str:
    """The script that runs `first` and, if its reply starts with one of `when`,
    `second` (see `_CHAIN_TAIL`)."""
    codes = ", ".join(f"[{int(c)}] = true" for c in when)
    return (
        f"local F1 = function(KEYS, ARGV)\n{first}\nend\n"
        f"local F2 = function(KEYS, ARGV)\n{second}\nend\n"
        f"local W = {{{codes}}}\n" + _CHAIN_TAIL
    )


def _no_orphan(_call: Call, _reply: Any) -> None:
    return None


class _Posted:
    """Where a posted call's reply goes: the part of a future the bus uses, calling
    back at once (never done before its reply: a post is never an orphan)."""

    __slots__ = ("_on_reply",)

    def __init__(self, on_reply: Callable[[Any], None]) -> None:
        self._on_reply = on_reply

    def done(self) -> bool:
        return False

    def set_result(self, reply: Any) -> None:
        self._call(reply)

    def set_exception(self, exc: BaseException) -> None:
        self._call(exc)

    def cancel(self) -> bool:
        self._call(asyncio.CancelledError())
        return True

    def _call(self, reply: Any) -> None:
        try:
            self._on_reply(reply)
        except Exception:  # one callback's bug must not cost the other calls their replies
            log.exception("a script reply's callback failed")


# A call's reply slot: the caller's future, or a posted call's callback.
Reply = asyncio.Future[Any] | _Posted


@record
class BusCall:
    """One call of a registered script, made by someone else (chained to a call of
    the caller's: `BusChain.call`)."""

    script: BusScript
    keys: Sequence[Any]
    args: Sequence[Any]


@dataclass(eq=False)
class _Batch:
    """Calls sent as one command, until their reply (or its deadline)."""

    calls: list[tuple[BusScript, Call, Reply]]
    attempt: int = 1
    sends: int = 0  # its deadline is its latest send's
    done: bool = False
    reloaded: bool = False
    sent: list[Any] = field(default_factory=list)  # the scripts it needs loaded


class _Deadlines:
    """Items that are due `delay` after they were added (so in the order added),
    checked by one timer instead of a `call_at` each (in uvloop a timer is a libuv
    handle to allocate, start, stop and close; two a request at saturation). The
    timer fires for the oldest item, then at most every `delay / 10`: an item may
    be found overdue up to that much late. An item done meanwhile is found and
    dropped by the sweep (`overdue` must ignore it)."""

    __slots__ = ("_armed", "_delay", "_items", "_loop", "_overdue", "_slack")

    def __init__(
        self, delay: float, overdue: Callable[[Any], None], loop: asyncio.AbstractEventLoop
    ) -> None:
        self._loop = loop
        self._delay = delay
        self._slack = delay / 10
        self._items: deque[tuple[float, Any]] = deque()
        self._armed = False
        self._overdue = overdue

    def add(self, item: Any) -> None:
        loop = self._loop
        due = loop.time() + self._delay
        self._items.append((due, item))
        if not self._armed:
            self._armed = True
            loop.call_at(due, self._sweep, loop)

    def _sweep(self, loop: asyncio.AbstractEventLoop) -> None:
        self._armed = False
        now = loop.time()
        items = self._items
        while items and items[0][0] <= now:
            self._overdue(items.popleft()[1])
        if items:
            self._armed = True
            loop.call_at(max(items[0][0], now + self._slack), self._sweep, loop)


class BusScript:
    """One registered script: its calls join the bus's batches."""

    def __init__(self, bus: ScriptBus, index: int, script: Any, on_orphan: Orphan) -> None:
        self.bus = bus
        self.index = index
        self.script = script  # redis-py Script: a lone call, and preloading
        self.on_orphan = on_orphan
        self.head = evalsha_head(script.sha)  # a lone call's command starts so
        self.index_bulk = bulk_count(index)  # its index in a wrapper call's ARGV

    def submit(self, keys: Sequence[Any], args: Sequence[Any]) -> asyncio.Future[Any]:
        """The call's reply, as a future (await it, add a callback, or leave it)."""
        return self.bus.submit(self, list(keys), list(args))

    def post(self, keys: list[Any], args: list[Any], on_reply: Callable[[Any], None]) -> None:
        """A call nobody waits for: `on_reply` gets its reply (an error as the
        exception instance; CancelledError when the bus closes first), called where
        the reply is read. No future, no loop callback: a request's settle and
        rate-limit finish are two of these each."""
        self.bus.enqueue(self, keys, args, _Posted(on_reply))

    async def call(
        self, keys: Sequence[Any], args: Sequence[Any], budget_s: float | None = None
    ) -> Any:
        """The reply. Past `budget_s`, TimeoutError (checked by the bus's sweep:
        cheaper than an `asyncio.timeout` around the await); the reply, given up on
        (that or a cancellation), becomes an orphan's."""
        fut = self.bus.submit(self, list(keys), list(args))
        if budget_s is not None:
            self.bus.deadlines(budget_s, _time_out).add(fut)
        try:
            return await fut
        finally:
            if fut.done() and not fut.cancelled():
                fut.exception()  # left with a failure (a cancelled wait): not to be logged


class BusChain:
    """Two scripts of one bus as one call (`ScriptBus.chain`)."""

    def __init__(self, script: BusScript) -> None:
        self.script = script

    async def call(
        self,
        keys: Sequence[Any],
        args: Sequence[Any],
        then: BusCall,
        budget_s: float | None = None,
    ) -> tuple[Any, Any]:
        """The first script's reply and the second's (None when it did not run;
        its error reply as an exception instance)."""
        reply = await self.script.call(
            [*keys, *then.keys], [f"{len(keys)} {len(args)}", *args, *then.args], budget_s
        )
        return _chained(reply)


def _chain_orphan(first: BusScript, second: BusScript, call: Call, reply: Any) -> None:
    """A chained call nobody waited for: each script's hook learns its part."""
    keys, args = call
    nk, na = (int(n) for n in args[0].split(" "))
    if isinstance(reply, BaseException):
        replies: tuple[Any, Any] = (reply, reply)
    else:
        try:
            replies = _chained(reply)
        except ResponseError as exc:
            replies = (exc, exc)
    first.on_orphan((keys[:nk], args[1 : na + 1]), replies[0])
    if replies[1] is not None:
        second.on_orphan((keys[nk:], args[na + 1 :]), replies[1])


def _chained(reply: Any) -> tuple[Any, Any]:
    if not isinstance(reply, list) or not 1 <= len(reply) <= 2:
        raise ResponseError(f"unexpected chained reply: {reply!r:.80}")
    return reply[0], reply[1] if len(reply) == 2 else None


class ScriptBus:
    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._cluster = isinstance(redis, RedisCluster)
        self._pipe = None if self._cluster else RedisPipe(redis)
        self._scripts: list[BusScript] = []
        self._multi: Any = None  # the wrapper of all registered scripts (redis-py Script)
        self._multi_head = b""
        self._keys_packer = KeyPacker()
        self._timeout = 1.0
        self._pending: list[tuple[BusScript, Call, Reply]] = []
        self._in_flight: set[_Batch] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._idle: list[asyncio.Future[None]] = []  # aclose's waits
        self._deadlines: dict[tuple[float, Callable[[Any], None]], _Deadlines] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the first call's

    def register(self, body: str, timeout_s: float, on_orphan: Orphan = _no_orphan) -> BusScript:
        """A script for this bus. `timeout_s` bounds how long a batch may wait for
        Redis (the longest of the scripts' counts): past it, the batch fails with
        TimeoutError and the connection is dropped (its replies would come late)."""
        script = BusScript(
            self, len(self._scripts) + 1, self._redis.register_script(body), on_orphan
        )
        self._scripts.append(script)
        self._multi = self._redis.register_script(
            multi_body([s.script.script for s in self._scripts])
        )
        self._multi_head = evalsha_head(self._multi.sha)
        self._timeout = max(self._timeout if len(self._scripts) > 1 else 0.0, timeout_s)
        return script

    def chain(self, first: BusScript, second: BusScript, when: Sequence[int]) -> BusChain:
        """A script running `first` then, when its reply starts with one of `when`,
        `second` in the same call (one round trip; atomic). Orphaned replies reach
        each script's own `on_orphan` with its part of the call."""
        if first.bus is not self or second.bus is not self:
            raise ValueError("a chain's scripts must be registered on its bus")
        body = chain_body(first.script.script, second.script.script, when)
        orphan = functools.partial(_chain_orphan, first, second)
        return BusChain(self.register(body, self._timeout, orphan))

    @property
    def scripts(self) -> list[Any]:
        """Every script and the wrapper (to load them ahead of the first call)."""
        return [*(s.script for s in self._scripts), self._multi]

    @property
    def pending(self) -> int:
        """Calls queued or in flight (tests wait for 0)."""
        return len(self._pending) + sum(len(b.calls) for b in self._in_flight) + len(self._tasks)

    def deadlines(self, delay_s: float, overdue: Callable[[Any], None]) -> _Deadlines:
        """The sweep of items due `delay_s` after they are added (one per delay)."""
        key = (delay_s, overdue)
        sweep = self._deadlines.get(key)
        if sweep is None:
            sweep = self._deadlines[key] = _Deadlines(delay_s, overdue, self._running_loop())
        return sweep

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop the bus works on, asked once: `asyncio.get_running_loop` is a
        getpid() system call each time on Python 3.11 (a bus serves one loop)."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def submit(self, script: BusScript, keys: list[Any], args: list[Any]) -> asyncio.Future[Any]:
        loop = self._loop or self._running_loop()
        # No done callback to mark a failure as retrieved (one more loop callback a
        # call): `call` retrieves it, and `submit`'s callers add their own callback.
        fut: asyncio.Future[Any] = loop.create_future()
        self.enqueue(script, keys, args, fut)
        return fut

    def enqueue(self, script: BusScript, keys: list[Any], args: list[Any], reply: Reply) -> None:
        self._pending.append((script, (keys, args), reply))
        if len(self._pending) == 1:
            # Two loop rounds: this tick's other callers and the next's join.
            loop = self._loop or self._running_loop()
            loop.call_soon(loop.call_soon, self._flush)

    def _flush(self) -> None:
        calls, self._pending = self._pending, []
        if not calls:
            return
        if self._cluster:
            self._spawn(self._flush_cluster(calls))
        else:
            for i in range(0, len(calls), MAX_CALLS):
                self._send(_Batch(calls[i : i + MAX_CALLS]))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(self._maybe_idle)

    # -- one node: packed, pipelined ---------------------------------------------

    def _send(self, batch: _Batch) -> None:
        assert self._pipe is not None
        calls = batch.calls
        keys_of = self._keys_packer
        if len(calls) == 1:
            script, (keys, args), _ = calls[0]
            batch.sent = [script.script]
            packed = evalsha(script.head, len(keys), len(args), (keys_of(keys), bulk_items(args)))
        else:
            batch.sent = [self._multi]
            # KEYS: every call's, each call's packed once per tuple (a user's keys);
            # ARGV: the number of calls, each call's (script, keys, args), its args.
            pieces: list[bytes] = []
            counts = [bulk_count(len(calls))]
            tail: list[Any] = []
            nkeys = 0
            for script, (keys, args), _ in calls:
                pieces.append(keys_of(keys))
                counts += (script.index_bulk, bulk_count(len(keys)), bulk_count(len(args)))
                nkeys += len(keys)
                tail += args
            pieces += counts
            pieces.append(bulk_items(tail))
            packed = evalsha(self._multi_head, nkeys, len(counts) + len(tail), pieces)
        self._in_flight.add(batch)
        batch.sends += 1
        self.deadlines(self._timeout, self._expire).add((batch, batch.sends))
        self._pipe.send(packed).add_done_callback(functools.partial(self._replied, batch))

    def _replied(self, batch: _Batch, fut: asyncio.Future[Any]) -> None:
        exc = fut.exception() if not fut.cancelled() else RedisConnectionError("cancelled")
        if batch.done:  # expired: nobody takes this reply (retrieved above all the same)
            return
        if isinstance(exc, NoScriptError) and not batch.reloaded:
            batch.reloaded = True
            self._spawn(self._reload(batch))
            return
        # A connection that broke under the batch: once more on a new one (as
        # redis-py's retry). Not after our own reset (an overdue reply): Redis is
        # slow, not gone, and the batch may have run already.
        if (
            isinstance(exc, RedisConnectionError)
            and not isinstance(exc, PipeReset)
            and batch.attempt == 1
        ):
            batch.attempt = 2
            self._close_batch(batch)
            batch.done = False
            self._send(batch)
            return
        self._close_batch(batch)
        if exc is not None:
            self._deliver(batch.calls, [exc] * len(batch.calls))
        elif len(batch.calls) == 1:
            self._deliver(batch.calls, [fut.result()])
        else:
            self._deliver(batch.calls, _split(fut.result(), len(batch.calls)))

    async def _reload(self, batch: _Batch) -> None:
        try:
            for script in batch.sent:
                await self._redis.script_load(script.script)
        except Exception as exc:
            if not batch.done:
                self._close_batch(batch)
                self._deliver(batch.calls, [exc] * len(batch.calls))
            return
        if not batch.done:
            self._close_batch(batch)
            batch.done = False
            self._send(batch)

    def _expire(self, sent: tuple[_Batch, int]) -> None:
        batch, sends = sent
        if batch.done or batch.sends != sends:  # answered, or sent again since
            return
        self._close_batch(batch)
        assert self._pipe is not None
        self._pipe.reset()  # its reply is overdue: the connection is not to be trusted
        failure = TimeoutError(f"Redis did not answer within {self._timeout:g} s")
        self._deliver(batch.calls, [failure] * len(batch.calls))

    def _close_batch(self, batch: _Batch) -> None:
        batch.done = True
        self._in_flight.discard(batch)

    def _deliver(self, calls: list[tuple[BusScript, Call, Reply]], replies: list[Any]) -> None:
        for (script, call, fut), reply in zip(calls, replies, strict=True):
            if fut.done():
                script.on_orphan(call, reply)
            elif isinstance(reply, BaseException):
                fut.set_exception(reply)
            else:
                fut.set_result(reply)
        self._maybe_idle()

    # -- a cluster: redis-py, one wrapper call per slot ---------------------------

    async def _flush_cluster(self, calls: list[tuple[BusScript, Call, Reply]]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                replies = await self._cluster_send([(s, c) for s, c, _ in calls])
        except Exception as exc:
            replies = [exc] * len(calls)
        except BaseException:  # cancelled (closing): nobody gets a reply
            for _, _, fut in calls:
                fut.cancel()
            raise
        self._deliver(calls, replies)

    async def _cluster_send(self, calls: list[tuple[BusScript, Call]]) -> list[Any]:
        if len(calls) == 1:
            script, (keys, args) = calls[0]
            try:
                return [await script.script(keys=keys, args=args)]
            except Exception as exc:  # handed to the caller
                return [exc]
        slots: dict[int, list[int]] = {}
        for i, (_, (keys, _)) in enumerate(calls):
            slot = key_slot(keys[0].encode() if isinstance(keys[0], str) else keys[0])
            slots.setdefault(slot, []).append(i)
        if len(slots) > 1:
            groups = list(slots.values())
            results = await asyncio.gather(
                *(self._cluster_send([calls[i] for i in group]) for group in groups),
                return_exceptions=True,
            )
            replies: list[Any] = [None] * len(calls)
            for group, result in zip(groups, results, strict=True):
                for n, i in enumerate(group):
                    replies[i] = result if isinstance(result, BaseException) else result[n]
            return replies
        counts: list[Any] = [len(calls)]
        keys_all: list[Any] = []
        args_all: list[Any] = []
        for script, (keys, args) in calls:
            counts += (script.index, len(keys), len(args))
            keys_all += keys
            args_all += args
        try:
            reply = await self._multi(keys=keys_all, args=counts + args_all)
        except Exception as exc:
            return [exc] * len(calls)
        return _split(reply, len(calls))

    # -- closing -----------------------------------------------------------------

    async def aclose(self, wait_s: float = 2.0) -> None:
        """Let the calls queued or in flight finish for up to `wait_s`."""
        if not self.pending:
            return
        idle = asyncio.get_running_loop().create_future()
        self._idle.append(idle)
        try:
            await asyncio.wait_for(asyncio.shield(idle), wait_s)
        except TimeoutError:
            pass
        finally:
            self._idle.remove(idle)

    def _maybe_idle(self, *_: object) -> None:
        """Wake `aclose` once nothing is queued or in flight."""
        if self._idle and not self.pending:
            for idle in self._idle:
                if not idle.done():
                    idle.set_result(None)

    async def close(self, wait_s: float = 2.0) -> None:
        """`aclose`, then whatever is left is cancelled and the connection closed."""
        await self.aclose(wait_s)
        for batch in list(self._in_flight):
            self._close_batch(batch)
            for _, _, fut in batch.calls:
                fut.cancel()
        for _, _, fut in self._pending:
            fut.cancel()
        self._pending = []
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pipe is not None:
            await self._pipe.close()


def _split(reply: Any, n: int) -> list[Any]:
    """A wrapper's reply: one reply per call (each may be an error)."""
    if not isinstance(reply, list) or len(reply) != n:
        return [ResponseError(f"unexpected batch reply: {reply!r:.80}")] * n
    return reply


def _time_out(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())
