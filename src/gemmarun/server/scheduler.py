"""One model thread runs the continuous-batching engine for every client.

Requests reach the thread through a queue; each step's events go back to the asyncio loop that
asked, one `call_soon_threadsafe` per loop and step. Only the model thread touches the engine
(`BatchEngine` is not thread-safe). A client that goes away closes its job, which cancels the
request in the engine at the thread's next turn, freeing its batch slot and KV cache. The number
of requests in flight (decoding or waiting for a slot) is capped; past it `submit` raises
`QueueFull` (429).
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import defaultdict
from dataclasses import dataclass, field

from ..batching import BatchEngine, Event
from ..constrain import GrammarError
from ..control import OutputControl
from ..llm import LLM, Prompt
from ..sampling import SamplingParams

log = logging.getLogger("gemmarun.server")


class QueueFull(Exception):
    pass


class EngineFailed(RuntimeError):
    """The model thread failed (500) or is stopping (503) while this request was in flight."""

    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.status = status


def request_failed(error: Exception) -> EngineFailed:
    """One request's failure in the engine: 400 where its own input cannot go on (a grammar no
    token can continue, a bad value), 500 otherwise."""
    status = 400 if isinstance(error, (GrammarError, ValueError)) else 500
    return EngineFailed(f"generation failed: {' '.join(str(error).split()) or type(error).__name__}", status)


@dataclass(eq=False)
class Job:
    prompt: Prompt
    params: SamplingParams
    top_logprobs: int | None
    control: OutputControl | None
    loop: asyncio.AbstractEventLoop
    scheduler: Scheduler
    inbox: asyncio.Queue = field(default_factory=asyncio.Queue)  # lists of Events, or an exception
    request_id: int | None = None  # set by the model thread
    finished: bool = False  # an event with a finish reason arrived
    closed: bool = False

    async def next_events(self) -> list[Event]:
        """The next step's events for this job (raises the engine's error for it)."""
        item = await self.inbox.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if any(ev.finish_reason for ev in item):
            self.finished = True
        return item

    def close(self) -> None:
        """Leave: cancels the request if it has not finished. Idempotent, loop thread only."""
        if self.closed:
            return
        self.closed = True
        self.scheduler._release(self)


class Scheduler:
    """`submit` from the event loop; `close` the job when done (or when the client leaves)."""

    def __init__(self, llm: LLM, *, max_batch: int = 8, max_queue: int = 64, context: int | None = None,
                 engine=None, drafter=None, prompt_caches: int = 4) -> None:
        self.engine = engine if engine is not None else BatchEngine(llm, max_batch=max_batch, context=context,
                                                                    drafter=drafter, prompt_caches=prompt_caches)
        self.capacity = self.engine.max_batch + max_queue
        self.in_flight = 0  # submitted, not yet closed (event loop side)
        self.cancelled = 0  # requests dropped before they finished: client gone, stop string (model thread)
        self._lock = threading.Lock()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._jobs: dict[int, Job] = {}  # model thread only
        self._thread: threading.Thread | None = None
        self._stopped = False  # stop() ran: the model thread is gone (or going)

    @property
    def context(self) -> int:
        return self.engine.context

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gemmarun-model", daemon=True)
                self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End every request in flight (503) and the model thread; later submits get a 503."""
        self._stopped = True
        thread = self._thread
        if thread is not None and thread.is_alive():
            self._commands.put(("stop", None))
            thread.join(timeout)

    def submit(self, prompt: Prompt, params: SamplingParams, top_logprobs: int | None = None,
               control: OutputControl | None = None) -> Job:
        if self._stopped:
            raise EngineFailed("the server is shutting down", 503)
        self.start()
        with self._lock:
            if self.in_flight >= self.capacity:
                raise QueueFull(f"the server is busy: {self.in_flight} requests in flight (limit {self.capacity})")
            self.in_flight += 1
        job = Job(prompt, params, top_logprobs, control, asyncio.get_running_loop(), self)
        self._commands.put(("add", job))
        return job

    def _release(self, job: Job) -> None:
        with self._lock:
            self.in_flight -= 1
        if not job.finished:
            self._commands.put(("cancel", job))

    # -- model thread ----------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            try:
                if self._turn():
                    return
            except Exception as e:
                log.exception("model thread error")
                self._fail_all(EngineFailed(f"generation failed: {' '.join(str(e).split()) or type(e).__name__}"))

    def _turn(self) -> bool:
        """Take the queued commands (waiting for one when idle), then step; True means stop."""
        try:
            command = self._commands.get(block=not self.engine.busy)
        except queue.Empty:
            command = None
        while command is not None:
            if command[0] == "stop":
                self._fail_all(EngineFailed("the server is shutting down", 503))
                return True
            self._handle(*command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                command = None
        if self.engine.busy:
            self._step()
        return False

    def _handle(self, kind: str, job: Job) -> None:
        if kind == "add":
            if job.closed:
                return
            try:
                job.request_id = self.engine.add(job.prompt, job.params, top_logprobs=job.top_logprobs,
                                                 control=job.control)
            except Exception as e:  # noqa: BLE001 - ContextOverflow, a bad seed...: this request only
                self._post(job, e)
                return
            self._jobs[job.request_id] = job
        elif kind == "cancel" and job.request_id in self._jobs:
            del self._jobs[job.request_id]
            if self.engine.cancel(job.request_id):
                self.cancelled += 1

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception as e:
            log.exception("model step failed")
            self._fail_all(EngineFailed(f"generation failed: {' '.join(str(e).split()) or type(e).__name__}"))
            return
        by_job: dict[Job, list[Event]] = defaultdict(list)
        for ev in events:
            job = self._jobs.get(ev.request_id)
            if job is None:
                continue
            if ev.finish_reason:
                del self._jobs[ev.request_id]
            if ev.error is not None:  # this request failed alone: its error, not its events
                self._post(job, request_failed(ev.error))
                continue
            by_job[job].append(ev)
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        for job, evs in by_job.items():
            by_loop[job.loop].append((job.inbox, evs))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop has closed
                pass

    def _fail_all(self, error: Exception) -> None:
        for rid, job in list(self._jobs.items()):
            self.engine.cancel(rid)
            self._post(job, error)
        self._jobs.clear()
        for r in [*self.engine.waiting, *self.engine.active]:  # anything it still holds
            self.engine.cancel(r.id)
        kept = getattr(self.engine, "prompt_cache", None)  # (a scripted test engine has none)
        if kept is not None:
            kept.clear()  # after a failed step (out of memory?) or at shutdown, the memory goes back

    def _post(self, job: Job, item) -> None:
        try:
            job.loop.call_soon_threadsafe(job.inbox.put_nowait, item)
        except RuntimeError:
            pass


def _deliver(items: list) -> None:
    for inbox, evs in items:
        inbox.put_nowait(evs)
