"""Dynamic batching for ``bbfl serve``'s text requests (embeddings, completions, echo, chat).

:class:`Batcher` merges what concurrent requests queued while the model was busy into one padded forward;
:data:`CLIENT_GONE` carries each request's "client disconnected" event from its handler into the worker
thread, so a queued job whose client has gone is dropped unrun. It knows nothing of the model or of HTTP:
the server hands it a ``run(items)`` callable, and the tests drive it alone.
"""

import queue
import threading
import time
from collections.abc import Callable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

from bbfl.serve.validate import APIError

# set by a text request's handler, read by Batcher.submit in the handler's worker thread (the context travels
# with run_in_threadpool): an event that is set once the request's client has disconnected
CLIENT_GONE: ContextVar[threading.Event | None] = ContextVar("bbfl_client_gone", default=None)


@dataclass
class _Job:
    items: list
    done: threading.Event = field(default_factory=threading.Event)
    result: list | None = None
    error: BaseException | None = None
    gone: threading.Event | None = None  # set when the client has disconnected: drop the job, unrun


class Batcher:
    """Dynamic batching: concurrent callers' items go through ``run`` together, in one model call.

    ``submit(items)`` blocks its (thread-pool) caller until its results are back. A worker thread takes
    the oldest job plus every job that queued up meanwhile, up to ``max_items`` items, and calls
    ``run(all_items) -> one result per item``. A busy server merges what arrived while it was busy; with
    ``max_wait_s > 0`` the worker also waits that long after the first job for more to arrive (TorchServe's
    ``maxBatchDelay``: a little latency for fuller batches). If a merged call fails, each job is retried
    alone so that one request's bad input fails only that request. A job whose client has gone by the time
    the worker reaches it (:data:`CLIENT_GONE`) is dropped without running.
    """

    def __init__(
        self, run: Callable[[list], Sequence], max_items: int, max_wait_s: float = 0.0, name: str = "batcher"
    ) -> None:
        self.run, self.max_items, self.max_wait_s = run, max(1, max_items), max_wait_s
        self.calls = 0  # model calls made
        self.jobs = 0  # requests served
        self.abandoned = 0  # requests dropped unrun: their client had gone
        self._queue: queue.Queue[_Job] = queue.Queue()
        self._carry: _Job | None = None  # a job that did not fit the last batch goes first next time
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def submit(self, items: list) -> list:
        job = _Job(list(items), gone=CLIENT_GONE.get())
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def _loop(self) -> None:
        while True:
            self._execute(self._next_batch())

    def _next_batch(self) -> list[_Job]:
        first, self._carry = self._carry or self._queue.get(), None
        while self._drop_if_gone(first):
            first = self._queue.get()
        jobs, count = [first], len(first.items)
        deadline = time.monotonic() + self.max_wait_s
        while count < self.max_items:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if self._drop_if_gone(job):
                continue
            if count + len(job.items) > self.max_items:
                self._carry = job
                break
            jobs.append(job)
            count += len(job.items)
        return jobs

    def _drop_if_gone(self, job: _Job) -> bool:
        if job.gone is None or not job.gone.is_set():
            return False
        job.error = APIError(499, "the client closed the connection before its turn; not run", "client_closed")
        self.abandoned += 1
        job.done.set()
        return True

    def _execute(self, jobs: list[_Job]) -> None:
        try:
            results = self._call([item for job in jobs for item in job.items])
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting caller(s), never swallowed
            if len(jobs) == 1:
                jobs[0].error = exc
                jobs[0].done.set()
            else:  # find whose input broke the merged call: each job alone
                for job in jobs:
                    self._execute([job])
            return
        start = 0
        for job in jobs:
            job.result, start = list(results[start : start + len(job.items)]), start + len(job.items)
            self.jobs += 1
            job.done.set()

    def _call(self, items: list) -> list:
        results: list = []
        for start in range(0, len(items), self.max_items):  # one big request is split too: memory stays capped
            chunk = items[start : start + self.max_items]
            self.calls += 1
            out = self.run(chunk)
            if len(out) != len(chunk):
                raise RuntimeError(f"batched call returned {len(out)} results for {len(chunk)} items")
            results.extend(out)
        return results
