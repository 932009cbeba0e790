"""Requests for the same model run as one batch.

On a 2-core Space a 32x32 network at batch 1 uses a sliver of the CPU, so twenty visitors pressing Compare at once
wait in line for work the machine could do together. ``Batcher.submit(key, rows)`` runs ``run(key, rows)``; a
request that arrives while another of the same key is running waits, and when that call ends every waiting
request of the key goes into the next call together (up to ``max_rows`` rows). A lone request never waits for
company: it runs at once, exactly as without the batcher. Each row keeps its own inputs (prompt, seed and so its
noise), so a row's result does not depend on what it was batched with, up to float rounding (tested).

Batches of different keys in one *lane* run one at a time (``lane(key)``; by default each key is its own): on 2
cores two batches at once only share the cores, and the requests that wait meanwhile join the next batch. The app
has two lanes, students (a fraction of a second) and teachers, so a student image never waits behind a teacher run;
and teachers are ``background`` keys: a teacher batch pauses at its next step while any student request is waiting
or running, so the students get the cores to themselves (on 2 cores two lanes at once would each run at half speed,
and a student batch ends long before the teacher's next step would).

One call per batch is also what ZeroGPU wants: one ``spaces.GPU`` allocation serves every visitor in it.
"""
from __future__ import annotations

import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Hashable, Sequence


@dataclass(eq=False)
class _Request:
    rows: list
    on_step: Callable | None = None  # this request's live progress: (done, total) of its batch's steps
    done: threading.Event = field(default_factory=threading.Event)
    leads: bool = False        # woken to run the next batch of its key, rather than with its results
    results: list | None = None
    error: BaseException | None = None


class Batcher:
    """``run(key, rows, on_step) -> results`` (one result per row, in order) called once per batch of requests
    that share ``key``; ``on_step(done, total)`` reaches every request of the batch that asked for progress (None
    when none did). ``max_rows`` bounds a batch's size, a row counting ``size(row)`` (a request is never split, so
    one bigger than that runs alone); ``max_rows`` may be a function of the key. A ``background(key)`` batch waits
    at each ``on_step`` while a request of a foreground key is in the batcher (``run`` must call ``on_step`` between
    steps for that; where it does not, as in a ZeroGPU worker, nothing pauses)."""

    def __init__(self, run: Callable[..., Sequence], max_rows: int | Callable[[Hashable], int],
                 size: Callable[[object], int] = lambda row: 1,
                 lane: Callable[[Hashable], Hashable] = lambda key: key,
                 background: Callable[[Hashable], bool] = lambda key: False):
        self._run, self._size, self._lane, self._background = run, size, lane, background
        self._foreground = 0  # foreground requests submitted and not yet answered
        self._foreground_done = threading.Condition()
        self._max_rows = max_rows if callable(max_rows) else lambda key: max_rows
        self._lanes: dict[Hashable, threading.Lock] = defaultdict(threading.Lock)
        self._lock = threading.Lock()
        self._waiting: dict[Hashable, list[_Request]] = defaultdict(list)
        self._busy: set[Hashable] = set()
        self.calls = 0  # batches run, for tests and benchmarks

    def submit(self, key: Hashable, rows: Sequence, on_step: Callable | None = None) -> list:
        """This request's results; its error, if its batch failed."""
        if self._background(key):
            return self._answer(key, _Request(list(rows), on_step))
        with self._foreground_done:
            self._foreground += 1
        try:
            return self._answer(key, _Request(list(rows), on_step))
        finally:
            with self._foreground_done:
                self._foreground -= 1
                self._foreground_done.notify_all()

    def _answer(self, key: Hashable, request: _Request) -> list:
        with self._lock:
            self._waiting[key].append(request)
            request.leads = key not in self._busy
            self._busy.add(key)
        while True:
            if not request.leads:
                request.done.wait()
                request.done.clear()
            if request.leads:
                request.leads = False
                self._run_next(key)
            if request.results is not None or request.error is not None:
                if request.error is not None:
                    raise request.error
                return request.results

    def _run_next(self, key: Hashable) -> None:
        """Take the waiting requests of ``key`` that fit one batch, run them, hand each its part, and pass the
        lead to the next waiting request (or free the key)."""
        batch = []
        try:
            with self._lock:
                lane = self._lanes[self._lane(key)]
            with lane:  # the batch is formed once the lane is free: whoever arrived meanwhile is in it
                limit = self._max_rows(key)
                with self._lock:
                    queue, size = self._waiting[key], 0
                    while queue and (not batch or size + self._weight(queue[0]) <= limit):
                        batch.append(queue.pop(0))
                        size += self._weight(batch[-1])
                self._run_batch(key, batch)
        except BaseException as err:  # noqa: BLE001  (handed to the requests' own threads)
            with self._lock:
                if not batch and self._waiting[key]:  # it failed before the batch formed: the leader's error
                    batch.append(self._waiting[key].pop(0))
            for request in batch:
                request.error = request.error or err
        finally:
            with self._lock:
                self.calls += 1
                queue = self._waiting[key]
                if queue:
                    queue[0].leads = True
                    queue[0].done.set()
                else:
                    del self._waiting[key]
                    self._busy.discard(key)
            for request in batch:
                if request.results is None and request.error is None:
                    request.error = RuntimeError("the batch stopped before this request was run")
                request.done.set()

    def _run_batch(self, key: Hashable, batch: list[_Request]) -> None:
        try:
            self._hand_out(key, batch)
        except Exception:
            if len(batch) == 1:
                raise
            for request in batch:  # one request's failure must not fail the others: each again, alone
                try:
                    self._hand_out(key, [request])
                except Exception as alone:  # noqa: BLE001  (handed to the request's own thread)
                    request.error = alone

    def _weight(self, request: _Request) -> int:
        return sum(self._size(row) for row in request.rows)

    def _hand_out(self, key: Hashable, batch: list[_Request]) -> None:
        rows = [row for request in batch for row in request.rows]
        listeners = [request.on_step for request in batch if request.on_step is not None]

        background = self._background(key)

        def on_step(done: int, total: int) -> None:
            if background:
                with self._foreground_done:
                    self._foreground_done.wait_for(lambda: self._foreground == 0)
            for listener in listeners:
                listener(done, total)
        results = list(self._run(key, rows, on_step if listeners or background else None))
        if len(results) != len(rows):
            raise RuntimeError(f"a batch of {len(rows)} rows gave {len(results)} results")
        start = 0
        for request in batch:
            request.results, start = results[start:start + len(request.rows)], start + len(request.rows)
