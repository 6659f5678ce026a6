"""Rank 0's scheduler and the other ranks' loop: the same engine calls, in the same order, on every rank.

Rank 0 collects pending requests (up to `max_batch` sequences per replica run at once; new ones join a running
batch between two tokens), then per iteration broadcasts one control message (step, or work to add/abort
first, or exit) and runs `Engine.add`/`step` exactly as the other ranks do after receiving it. Invariant: the
other ranks call the engine only as a control message says, so every collective is matched; a failing request
is refused on rank 0 before any broadcast, and an error inside the engine (raised alike on every rank) fails
the running requests and resets the engine, never the ranks.
"""
from __future__ import annotations

import datetime
import json
import os
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, fields
from typing import Callable

import torch
import torch.distributed as dist

from meshtron.comm import collectives as C
from meshtron.inference import Engine, Event, Request, SamplingParams

STEP, WORK, EXIT = 0, 1, 2


class Control:
    """Rank 0 -> every rank, on its own process group (long timeout: the others wait while the server idles)."""

    def __init__(self, world: int):
        self.world = world
        self.group = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365)) if world > 1 else None
        if self.group is not None:                 # failures name this group, the op and the rank (comm/)
            C.register_group(self.group, "serve-control", tuple(range(world)))

    def send(self, kind: int, payload=None) -> None:
        if self.group is None:
            return
        data = encode_work(**payload).encode() if kind == WORK else b""
        head = torch.tensor([kind, len(data)], dtype=torch.long)
        C.broadcast(head, 0, self.group)
        if data:
            C.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), 0, self.group)

    def recv(self):
        head = torch.empty(2, dtype=torch.long)
        C.broadcast(head, 0, self.group)
        kind, n = head.tolist()
        if kind != WORK:
            return kind, None
        buf = torch.empty(n, dtype=torch.uint8)
        C.broadcast(buf, 0, self.group)
        return kind, decode_work(buf.numpy().tobytes().decode())


def encode_work(add: list[Request], abort: list) -> str:
    """A WORK message as JSON (data only: what the other ranks read cannot run code). Request ids and share
    keys are strings (the server's); logit_bias keys, integers, travel as [id, bias] pairs."""
    def params(p: SamplingParams) -> dict:
        d = {f.name: getattr(p, f.name) for f in fields(p)}
        d["logit_bias"] = None if p.logit_bias is None else [[int(k), float(v)] for k, v in p.logit_bias.items()]
        d["stop"] = list(p.stop)
        return d
    return json.dumps({"add": [{"id": r.id, "prompt_ids": [int(t) for t in r.prompt_ids], "params": params(r.params),
                                "share": r.share} for r in add], "abort": list(abort)})


def decode_work(text: str) -> dict:
    """The inverse of `encode_work`: {"add": [Request, ...], "abort": [id, ...]}."""
    msg = json.loads(text)
    add = []
    for r in msg["add"]:
        p = dict(r["params"])
        p["logit_bias"] = None if p["logit_bias"] is None else {int(k): float(v) for k, v in p["logit_bias"]}
        add.append(Request(r["id"], r["prompt_ids"], SamplingParams(**p), share=r["share"]))
    return {"add": add, "abort": msg["abort"]}


def _fault(rank: int, iteration: int) -> None:
    """Fault injection for tests: `MESHTRON_SERVE_FAULT=rank=R:iteration=N` makes rank R's engine fail (as an
    out-of-memory on one rank would) at its Nth iteration. Unset in normal use."""
    spec = os.environ.get("MESHTRON_SERVE_FAULT")
    if spec:
        want = dict(p.split("=", 1) for p in spec.split(":"))
        if int(want.get("rank", -1)) == rank and int(want.get("iteration", -1)) == iteration:
            raise RuntimeError(f"injected fault on rank {rank} at iteration {iteration} (MESHTRON_SERVE_FAULT)")


def _run(engine: Engine, add: list[Request], abort: list) -> list[Event]:
    """One iteration, identical on every rank."""
    engine.abort(abort)
    events = engine.add(add) if add else []
    if engine.running:
        events += engine.step()
    return events


def follow(engine: Engine, control: Control, rank: int) -> None:
    """The loop of every rank but 0: do what rank 0 says until it says exit. An error ends it (the caller exits
    non-zero): this rank may be out of step with the others, and must not serve on."""
    iteration = 0
    while True:
        kind, msg = control.recv()
        if kind == EXIT:
            return
        add, abort = (msg["add"], msg["abort"]) if kind == WORK else ([], [])
        iteration += 1
        _fault(rank, iteration)
        _run(engine, add, abort)


@dataclass
class Job:
    """One sequence of one HTTP request; `sink(event_or_exception)` is called from the scheduler's thread."""
    request: Request
    sink: Callable[[object], None]


class Scheduler:
    def __init__(self, engine: Engine, control: Control, max_batch: int, batch_wait_s: float = 0.002,
                 on_fatal: Callable[[BaseException], None] | None = None):
        self.engine, self.control, self.max_batch, self.batch_wait_s = engine, control, max_batch, batch_wait_s
        self.on_fatal = on_fatal
        self.jobs: dict[object, Job] = {}
        self._pending: deque[Job] = deque()
        self._cancelled: set = set()
        self._cv = threading.Condition()
        self._stop = False
        self.error: BaseException | None = None
        self.stats = {"sequences": 0, "iterations": 0, "tokens": 0, "max_running": 0}

    # ---- called from the HTTP side -----------------------------------------------------------------------

    @property
    def alive(self) -> bool:
        return not self._stop and self.error is None

    def submit(self, jobs: list[Job]) -> None:
        with self._cv:
            if self._stop or self.error is not None:
                raise RuntimeError("the server is shutting down")
            self._pending.extend(jobs)
            self._cv.notify()

    def cancel(self, ids) -> None:
        with self._cv:
            self._cancelled.update(ids)
            self._cv.notify()

    def queued(self) -> int:
        return len(self._pending)

    def stop(self) -> None:
        """Make `run` return after the current iteration (requests still waiting are failed)."""
        with self._cv:
            self._stop = True
            self._cv.notify()

    def fail(self, error: BaseException) -> None:
        """Another rank is gone: stop serving at once (`/health` 503), without telling the ranks to exit."""
        with self._cv:
            if self.error is None:
                self.error = error
            self._stop = True
            self._cv.notify()

    # ---- the scheduler's own thread (the main thread: torch runs fastest there) ------------------------------

    def run(self) -> None:
        """Serve until `stop()`, then tell the other ranks to exit; any engine or control error (or `fail`) ends
        it with `error` set, the requests failed, and `on_fatal` called."""
        try:
            self._loop()
        except BaseException as e:  # noqa: BLE001 - the ranks are gone or out of step: the server must stop
            traceback.print_exc()
            with self._cv:
                self.error = self.error or e
        if self.error is not None:
            with self._cv:
                jobs, self._pending = list(self.jobs.values()) + list(self._pending), deque()
            self._fail(jobs, self.error)
            if self.on_fatal is not None:
                self.on_fatal(self.error)
            return
        try:
            self.control.send(EXIT)
        except Exception:  # noqa: BLE001 - the other ranks are already gone
            traceback.print_exc()

    def _loop(self) -> None:
        engine, iteration = self.engine, 0
        while True:
            with self._cv:
                while not self._stop and not engine.running and not self._pending:
                    self._cv.wait()
                if self._stop:
                    jobs, self._pending = list(self.jobs.values()) + list(self._pending), deque()
                    self._fail(jobs, self.error or RuntimeError("the server stopped"))
                    return
            if not engine.running and self.batch_wait_s:
                time.sleep(self.batch_wait_s)                 # let requests sent together start together
            add, abort = self._take()
            if not add and not abort and not engine.running:
                continue
            if add or abort:
                self.control.send(WORK, {"add": add, "abort": abort})
            else:
                self.control.send(STEP)
            iteration += 1
            _fault(0, iteration)
            events = _run(engine, add, abort)           # an error here is fatal: `run` stops the server
            st = self.stats
            st["sequences"] += len(add)
            st["iterations"] += 1
            st["tokens"] += len(events)
            st["max_running"] = max(st["max_running"], engine.running + sum(e.finish_reason is not None
                                                                             for e in events))
            for ev in events:
                job = self.jobs.get(ev.id)
                if ev.finish_reason is not None:
                    self.jobs.pop(ev.id, None)
                if job is not None:
                    self._deliver(job, ev)

    def _take(self) -> tuple[list[Request], list]:
        """Requests to start now (checked; refused ones are answered) and running ids to drop."""
        engine = self.engine
        add: list[Request] = []
        with self._cv:
            abort = [i for i in self._cancelled if i in engine.seqs]
            self._cancelled -= set(abort)
            if self._cancelled:                        # cancelled before they started (or after they ended)
                waiting = {j.request.id for j in self._pending}
                self._cancelled -= {i for i in self._cancelled if i not in self.jobs and i not in waiting}
            free = self.max_batch * engine.replicas - engine.running
            while self._pending and len(add) < free:
                job = self._pending.popleft()
                if job.request.id in self._cancelled:
                    self._cancelled.discard(job.request.id)
                    continue
                try:
                    engine.check(job.request)
                except ValueError as e:
                    self._deliver(job, e)
                    continue
                self.jobs[job.request.id] = job
                add.append(job.request)
        for i in abort:
            self.jobs.pop(i, None)
        return add, abort

    def _deliver(self, job: Job, item) -> None:
        try:
            job.sink(item)
        except Exception:  # noqa: BLE001 - the client is gone (its event loop closed): drop it next iteration
            self.cancel([job.request.id])

    def _fail(self, jobs: list[Job], error: BaseException) -> None:
        for job in jobs:
            self.jobs.pop(job.request.id, None)
            self._deliver(job, error)
