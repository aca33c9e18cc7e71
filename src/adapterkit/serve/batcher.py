"""The dynamic batcher and the model thread.

Requests arrive from any thread as rows (one per input text or prompt) naming a resident or
not-yet-loaded adapter version. One model thread owns the AdaptedModel: it runs queued control
operations (adapter installs, evictions) between batches, then takes up to `max_batch` rows,
waiting at most `max_wait` after the oldest one arrived, and runs them as ONE forward with per-row
routing, whatever adapters they name. Rows for adapters still loading wait aside ("parked") while
an I/O thread reads its files, so a cold adapter holds up nobody else for longer than the
millisecond or so its install takes between two batches.
Adapter versions with queued or running rows are pinned: eviction passes over them.

Generation is scheduled at every step when the batcher has a `decoder` (continuous batching): each
pass of the model thread admits waiting prompts up to `max_batch` running rows, runs one decode step
for all of them, and hands back the rows that finished; a cancelled row leaves before the next step.
Encode batches run between two steps. Without a decoder a generation batch runs to its end.
A prefill costs about as much as a decode step whether it takes one newcomer or four, so while rows
are decoding, newcomers are admitted `min_admit` at a time (or all that wait, if fewer): a steady
trickle of single-row prefills would otherwise take half the model thread's time under load.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from .cache import AdapterCache, AdapterKey
from .errors import Overloaded, RowFailure
from .metrics import ServeMetrics

#: a batch: (request, row index) pairs, all of one kind ("encode" rows or "generate" rows)
Items = list[tuple["Request", int]]


class RequestKind(str, Enum):
    CLASSIFY = "classify"
    EMBED = "embed"
    GENERATE = "generate"
    LOAD = "load"  # no rows: resolves once the adapter is resident


@dataclass(eq=False)
class Request:
    kind: RequestKind
    key: AdapterKey | None  # None: the base model (or a mixture)
    rows: list[list[int]]
    options: dict[str, Any] = field(default_factory=dict)
    on_token: Callable[[int], None] | None = None
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)
    #: a weighted set of adapters instead of `key`: ((key, weight), ...) by name
    mixture: tuple[tuple[AdapterKey, float], ...] | None = None

    def __post_init__(self) -> None:
        self.results: list[Any] = [None] * len(self.rows)
        self.remaining = len(self.rows)
        self.missing: set[AdapterKey] = set()  # its adapters not resident yet (it waits for them)

    @property
    def keys(self) -> tuple[AdapterKey, ...]:
        """Every adapter the request needs resident (pinned while it is queued or running)."""
        if self.mixture is not None:
            return tuple(k for k, _ in self.mixture)
        return (self.key,) if self.key is not None else ()

    @property
    def queue(self) -> str:
        return "generate" if self.kind == RequestKind.GENERATE else "encode"


class Decoder(Protocol):
    """A running decode (see decode.py), its rows named by (request, row index) handles."""

    @property
    def running(self) -> int: ...
    def admit(self, items: Items) -> list[tuple[tuple[Request, int], Any]]: ...
    def step(self) -> list[tuple[tuple[Request, int], Any]]: ...
    def drop(self, gone: Callable[[Any], bool]) -> list[Any]: ...
    def abort(self) -> list[Any]: ...


class Batcher:
    def __init__(
        self, cache: AdapterCache, read: Callable[[AdapterKey], tuple[dict, dict]],
        execute: Callable[[str, Items], list[Any]], metrics: ServeMetrics, *,
        max_batch: int = 32, max_wait_ms: float = 5.0, max_queue_rows: int = 4096, name: str = "adapterkit-model",
        decoder: Decoder | None = None, min_admit: int | None = None, max_mixed_rows: int = 8,
    ) -> None:
        self.cache, self.read, self.execute, self.metrics = cache, read, execute, metrics
        #: rows with a mixture per batch: each costs the batch a pass per mixture component at every site
        self.max_mixed_rows = max(1, max_mixed_rows)
        self.decoder = decoder
        self.min_admit = max(1, min_admit if min_admit is not None else max_batch // 8)
        self.max_batch, self.max_wait, self.max_queue_rows = max(1, max_batch), max_wait_ms / 1000.0, max_queue_rows
        self._cond = threading.Condition()
        self._queues: dict[str, deque[tuple[Request, int]]] = {"encode": deque(), "generate": deque()}
        self._ops: list[Callable[[], None]] = []
        self._parked: dict[AdapterKey, list[Request]] = {}
        self._loading: set[AdapterKey] = set()
        self._pins: Counter[AdapterKey] = Counter()
        self._doomed: set[AdapterKey] = set()
        self._queued_rows = 0
        self._closed = False
        self._io = ThreadPoolExecutor(2, thread_name_prefix="adapterkit-load")
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # --- any thread ---------------------------------------------------------------------------

    @property
    def queued_rows(self) -> int:
        return self._queued_rows

    def submit(self, req: Request) -> Future:
        with self._cond:
            if self._closed:
                raise Overloaded("the engine is shutting down")
            if self._queued_rows + len(req.rows) > self.max_queue_rows:
                raise Overloaded(f"more than {self.max_queue_rows} rows are waiting; retry shortly")
            for key in req.keys:
                self._pins[key] += 1
                if self.cache.touch(key) is None:
                    req.missing.add(key)
            if req.missing:
                self._queued_rows += len(req.rows)
                for key in req.missing:
                    self._parked.setdefault(key, []).append(req)
                    if key not in self._loading:
                        self._loading.add(key)
                        self._io.submit(self._read_then_install, key)
                return req.future
            self._queued_rows += len(req.rows)
            self._ready(req)
            self._cond.notify_all()
        return req.future

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` in the model thread between two batches; its result or error in the future."""
        future: Future = Future()

        def op() -> None:
            try:
                _resolve(future, fn())
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                _reject(future, err)

        self._post(op)
        return future

    def doom(self, keys: list[AdapterKey]) -> None:
        """Evict these versions as soon as no queued or running request needs them."""
        with self._cond:
            self._doomed.update(keys)
            self._cond.notify_all()

    def evict(self, keys: list[AdapterKey]) -> Future:
        """Doom these versions and run the eviction pass now; resolves once the versions that no
        request needs have left memory."""
        self.doom(keys)
        return self.call(self._maintain)

    def close(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        self._io.shutdown(wait=False, cancel_futures=True)

    # --- loading ------------------------------------------------------------------------------

    def _post(self, op: Callable[[], None]) -> None:
        with self._cond:
            if self._closed and not self._thread.is_alive():  # nobody would run it: run it here
                ops_now = True
            else:
                ops_now = False
                self._ops.append(op)
                self._cond.notify_all()
        if ops_now:
            op()

    def _read_then_install(self, key: AdapterKey) -> None:
        """On an I/O thread: read the adapter's files; the model thread installs it between batches."""
        start = time.perf_counter()
        try:
            manifest, tensors = self.read(key)
        except BaseException as err:  # noqa: BLE001 - reported to the parked requests
            self._post(functools.partial(self._load_failed, key, err))  # err is unbound after the except
            return
        self._post(lambda: self._install(key, manifest, tensors, start))

    def _install(self, key: AdapterKey, manifest: dict, tensors: dict, start: float) -> None:
        with self._cond:
            pinned = {k for k, n in self._pins.items() if n > 0} | self._loading
        try:
            self.cache.install(key, manifest, tensors, pinned)
        except BaseException as err:  # noqa: BLE001
            self._load_failed(key, err)
            return
        self.metrics.hot_load.observe(time.perf_counter() - start)
        with self._cond:
            self._loading.discard(key)
            for req in self._parked.pop(key, []):
                req.missing.discard(key)
                if not req.missing:  # a mixture waits for all its adapters
                    self._ready(req)

    def _load_failed(self, key: AdapterKey, err: BaseException) -> None:
        with self._cond:
            self._loading.discard(key)
            parked = self._parked.pop(key, [])
            for req in parked:
                self._queued_rows -= len(req.rows)
                for other in req.missing - {key}:  # a mixture parked for other adapters too leaves them
                    self._parked[other] = [r for r in self._parked.get(other, []) if r is not req]
                req.missing.clear()
        for req in parked:
            self._fail(req, err)

    def _ready(self, req: Request) -> None:  # under self._cond
        if not req.rows:
            self._finish(req)
            return
        self._queues[req.queue].extend((req, i) for i in range(len(req.rows)))

    # --- the model thread ---------------------------------------------------------------------

    def _decoding(self) -> int:
        return self.decoder.running if self.decoder is not None else 0

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._ops or self._queues["encode"] or self._queues["generate"] or self._decoding()
                           or self._closed):
                    self._cond.wait()
                if self._closed:
                    break
                ops, self._ops = self._ops, []
            for op in ops:
                op()
            if self.decoder is None:
                kind, items = self._collect()
                if items:
                    self._run_batch(kind, items)
            else:
                self._continuous_pass(self.decoder)
            self._maintain()
        self._shutdown()

    def _continuous_pass(self, decoder: Decoder) -> None:
        """Encode rows or newcomers to the decode (the older first), then one decode step."""
        dropped = decoder.drop(lambda item: item[0].future.done())
        if dropped:
            with self._cond:
                for req, _ in dropped:
                    self._unpin(req)
        running = decoder.running
        room = self.max_batch - running
        if running and room < min(self.min_admit, len(self._queues["generate"])):
            room = 0  # newcomers wait for a few more rows to leave, then prefill together
        kind, items = self._collect(room=room, wait=running == 0)
        if kind == "encode" and items:
            self._run_batch(kind, items)
        elif items:
            self._decode(decoder, "generate", lambda: decoder.admit(items), items)
        if decoder.running:
            self._decode(decoder, "generate", decoder.step, None)

    def _decode(self, decoder: Decoder, kind: str, run: Callable[[], list], items: Items | None) -> None:
        """Admit (`items`) or step (None: every running row); a failure fails exactly those rows."""
        start = time.perf_counter()
        try:
            finished = run()
        except BaseException as err:  # noqa: BLE001 - one bad batch must not stop the server
            failed = items if items is not None else decoder.abort()
            for req in list({id(r): r for r, _ in failed}.values()):
                self._fail(req, err)
            return
        if items is None:
            self.metrics.batch_rows.labels(kind).observe(decoder.running + len(finished))
            self.metrics.batch_seconds.labels(kind).observe(time.perf_counter() - start)
        self._complete(finished)

    def _collect(self, room: int | None = None, wait: bool = True) -> tuple[str, Items]:
        """The oldest queue's next batch: up to `max_batch` rows (generation rows: up to `room`),
        waiting up to `max_wait` after its oldest row for more, if `wait`."""
        with self._cond:
            waiting = [(q[0][0].arrived, kind) for kind, q in self._queues.items()
                       if q and (kind == "encode" or room is None or room > 0)]
            if not waiting:
                return "", []
            kind = min(waiting)[1]
            queue = self._queues[kind]
            limit = self.max_batch if kind == "encode" or room is None else room
            deadline = queue[0][0].arrived + (self.max_wait if wait else 0.0)
            while len(queue) < limit and not self._ops and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            items: Items = []
            held: list[tuple[Request, int]] = []  # mixed rows over this batch's bound: the next batch's
            mixed = 0
            while queue and len(items) < limit:
                req, i = queue.popleft()
                if req.mixture is not None and not req.future.done():
                    if mixed >= self.max_mixed_rows:
                        held.append((req, i))
                        continue
                    mixed += 1
                self._queued_rows -= 1
                if req.future.done():  # a failed or cancelled request: drop its rows, free its adapter
                    self._unpin(req)
                else:
                    items.append((req, i))
            queue.extendleft(reversed(held))
            return kind, items

    def _run_batch(self, kind: str, items: Items) -> None:
        self.metrics.batch_rows.labels(kind).observe(len(items))
        start = time.perf_counter()
        try:
            results = self.execute(kind, items)
            self.metrics.batch_seconds.labels(kind).observe(time.perf_counter() - start)
        except BaseException as err:  # noqa: BLE001 - one bad batch must not stop the server
            requests = list({id(r): r for r, _ in items}.values())
            if len(requests) > 1 and kind == "encode":
                # A failing row fails its own request only: the batch runs again one request at a
                # time. (Generation streams tokens as it goes, so a generation batch is not re-run.)
                self.metrics.isolated_batches.inc()
                for req in requests:
                    self._run_batch(kind, [(r, i) for r, i in items if r is req])
                return
            for req in requests:
                self._fail(req, err)
            return
        self._complete(list(zip(items, results, strict=True)))

    def _complete(self, finished: list[tuple[tuple[Request, int], Any]]) -> None:
        done = []
        for (req, i), result in finished:
            if isinstance(result, RowFailure):  # this row alone failed: its request, not the batch
                self._fail(req, result.error)
                continue
            req.results[i] = result
            req.remaining -= 1
            if req.remaining == 0:
                done.append(req)
        if done:
            with self._cond:
                for req in done:
                    self._finish(req)

    def _maintain(self) -> None:
        with self._cond:
            pinned = {k for k, n in self._pins.items() if n > 0}
            victims = [k for k in self._doomed if k not in pinned]
            self._doomed.difference_update(victims)
            victims += [k for k in self.cache.over_budget(pinned | self._loading) if k not in victims]
            for key in victims:  # under the lock, so no request can pin a key while it goes
                self.cache.evict(key)

    def _finish(self, req: Request) -> None:  # under self._cond
        self._unpin(req)
        _resolve(req.future, req.results)

    def _fail(self, req: Request, err: BaseException) -> None:
        with self._cond:
            self._unpin(req)
        _reject(req.future, err)

    def _unpin(self, req: Request) -> None:
        if req.keys and not getattr(req, "_unpinned", False):
            req._unpinned = True  # type: ignore[attr-defined]
            for key in req.keys:
                self._pins[key] -= 1
                if self._pins[key] <= 0:
                    del self._pins[key]

    def _shutdown(self) -> None:
        with self._cond:
            ops, self._ops = self._ops, []
        for op in ops:
            op()
        with self._cond:
            pending = [r for q in self._queues.values() for r, _ in q]
            pending += [r for r, _ in (self.decoder.abort() if self.decoder is not None else [])]
            pending += list(itertools.chain.from_iterable(self._parked.values()))
            self._queues = {"encode": deque(), "generate": deque()}
            self._parked.clear()
        for req in {id(r): r for r in pending}.values():
            self._fail(req, Overloaded("the engine was closed before this request ran"))


def _resolve(future: Future, value: Any) -> None:
    try:
        future.set_result(value)
    except InvalidStateError:  # cancelled by its caller meanwhile
        pass


def _reject(future: Future, err: BaseException) -> None:
    if not isinstance(err, Exception):
        err = RuntimeError(repr(err))
    try:
        future.set_exception(err)
    except InvalidStateError:
        pass
