"""One worker thread owns the model; requests wait in a bounded queue.

The model holds one KV cache, so replies are produced one at a time. A request
first takes a place with `ModelWorker.admit()` (`QueueFull` at once when all
`max_queue` places are taken: the server answers 503), then decodes its images
and is `submit`ted as a `Job`. The worker streams each job's events back to the
asyncio loop that waits for them; a cancelled job (client gone) is skipped, or
stops at the next event and the engine's generator is closed (the positions
it had evaluated stay in the cache for the next prompt that shares them). `begin_shutdown()` answers every waiting
job with `ShuttingDown` and ends the running reply with a `Stopped` event.
Replies come from `Model.stream_messages`, the API's entry that every face uses.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from typing import Any

from .request import DEFAULT_MAX_QUEUE

log = logging.getLogger("r4b_edge.serve")

END = object()  # last item a job ever yields


class QueueFull(Exception):
    """The bounded request queue has no room."""


class ShuttingDown(Exception):
    """The server is stopping: no new work, waiting work is dropped."""


class Stopped:
    """Last event of a reply cut short by shutdown (before END)."""

    reason = "shutdown"


class Job:
    """One request: what to generate and where its events go."""

    def __init__(self, messages: list, images: list, options: dict[str, Any],
                 loop: asyncio.AbstractEventLoop):
        self.messages, self.images, self.options = messages, images, options
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = threading.Event()

    def emit(self, item: Any) -> None:
        """Hand an event (or an exception, or END) to the waiting coroutine."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody listens any more
            self.cancelled.set()

    async def next(self) -> Any:
        """The next event, an exception instance, or END."""
        return await self.events.get()

    def cancel(self) -> None:
        self.cancelled.set()


class ModelWorker:
    """A daemon thread serving `Job`s from a bounded queue, one at a time."""

    def __init__(self, model: Any, max_queue: int = DEFAULT_MAX_QUEUE):
        if max_queue < 1:
            raise ValueError(f"max_queue must be >= 1, got {max_queue}")
        self.model = model
        self.max_queue = max_queue
        self._q: queue.Queue = queue.Queue()  # bounded by admission: at most max_queue jobs wait
        self._places = 0  # admitted and not yet started (decoding images or queued)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.busy = False
        self.served = 0
        self._thread = threading.Thread(target=self._run, name="r4b-model-worker", daemon=True)

    def start(self) -> "ModelWorker":
        self._thread.start()
        return self

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def full(self) -> bool:
        return self._places >= self.max_queue

    def pending(self) -> int:
        """Requests holding a place: decoding their images or waiting for the model."""
        return self._places

    def admit(self) -> None:
        """Take a queue place, or raise QueueFull / ShuttingDown without waiting.
        Every admit is followed by exactly one `submit` or `release`."""
        with self._lock:
            if self._stop.is_set():
                raise ShuttingDown()
            if self._places >= self.max_queue:
                raise QueueFull(f"all {self.max_queue} queue places are taken")
            self._places += 1

    def release(self) -> None:
        """Give back an admitted place that will not be submitted."""
        with self._lock:
            self._places -= 1

    def submit(self, job: Job) -> None:
        """Queue an admitted job (ShuttingDown once shutdown has begun: then `release` the place)."""
        with self._lock:
            if self._stop.is_set():
                raise ShuttingDown()
            self._q.put_nowait(job)

    def begin_shutdown(self) -> None:
        """No new jobs; queued jobs get ShuttingDown now; the running reply ends with `Stopped`."""
        with self._lock:
            self._stop.set()
            while True:
                try:
                    job = self._q.get_nowait()
                except queue.Empty:
                    break
                self._places -= 1
                job.emit(ShuttingDown())
                job.emit(END)

    def stop(self, timeout: float = 10.0) -> None:
        """Shut down (see `begin_shutdown`) and wait for the worker thread."""
        self.begin_shutdown()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                job = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            with self._lock:
                self._places -= 1
            if job.cancelled.is_set():  # its client left while it waited
                job.emit(END)
                continue
            self.busy = True
            try:
                self._serve(job)
            finally:
                self.busy = False
                self.served += 1
                job.emit(END)

    def _serve(self, job: Job) -> None:
        gen = None
        try:
            gen = self.model.stream_messages(job.messages, job.images, **job.options)
            for ev in gen:
                if job.cancelled.is_set():
                    break
                if self._stop.is_set():
                    job.emit(Stopped())
                    break
                job.emit(ev)
        except Exception as e:  # reported to the client; the worker lives on
            if not _is_project_error(e):  # a bug, not a bad request: keep the traceback in the log
                log.exception("generation failed")
            job.emit(e)
        finally:
            if gen is not None:
                gen.close()  # a stopped reply: the next prompt keeps only the prefix it shares with the cache


def _is_project_error(e: BaseException) -> bool:
    from r4b_edge.errors import R4BError

    return isinstance(e, R4BError)
