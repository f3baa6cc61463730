"""Request scheduling for the server: a bounded queue and a worker thread that decodes in batches.

Requests are prepared (media decoded, prompt tokenized) in the caller's thread so bad input fails
before queueing. One worker thread owns the model: it takes up to ``max_batch`` waiting jobs, prefills
them together and decodes them step by step, pushing text pieces to each job's event queue. A job whose
client went away is cancelled: it stops receiving tokens, and the batch ends early once every job in it
is finished or cancelled.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from nvila.base.errors import NvilaError
from nvila.formats.plans import Prompt
from nvila.generate import SamplingParams, Trim


class QueueFull(NvilaError):
    """The server's request queue is full (HTTP 429)."""


@dataclass
class Job:
    """One generation request and the channel its results come back on."""

    prompt: Prompt
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)  # ("text", str) | ("done", dict) | ("error", exc)
    cancelled: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0
    finish_reason: str = "length"
    # answer text -> (text with time tokens as seconds, segments); None: the text is returned as decoded
    render: Callable[[str], tuple[str, list[Any]]] | None = None

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Engine:
    """Owns the pipeline; serialises model use through one worker thread."""

    def __init__(self, pipe: Any, max_queue: int = 64, max_batch: int = 8) -> None:
        self.pipe = pipe
        self.max_queue = max_queue
        self.max_batch = max_batch
        self.batch_window_s = 0.05
        self._waiting: deque[Job] = deque()
        self._running = 0
        self._cv = threading.Condition()
        self._stop = False
        self._served = {"requests": 0, "batches": 0, "largest_batch": 0}
        self._thread = threading.Thread(target=self._work, name="nvila-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job or raise QueueFull when ``max_queue`` jobs are already waiting or running."""
        with self._cv:
            if len(self._waiting) + self._running >= self.max_queue:
                raise QueueFull(f"the server is busy ({self.max_queue} requests queued); retry later")
            self._waiting.append(job)
            self._cv.notify()

    def stats(self) -> dict[str, int]:
        """Requests waiting and running, and what the worker has served: requests, batches, largest batch."""
        with self._cv:
            return {"waiting": len(self._waiting), "running": self._running, **self._served}

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=30)

    def _work(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._stop:
                    self._cv.wait()
                if self._stop:
                    return
                # a short window lets requests that arrive together (clients that all just got their
                # previous answer) share one batch instead of queueing behind a batch of one
                deadline = time.monotonic() + self.batch_window_s
                while len(self._waiting) < self.max_batch and not self._stop:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._cv.wait(left)
                batch = [self._waiting.popleft() for _ in range(min(self.max_batch, len(self._waiting)))]
                self._running = len(batch)
            batch = [j for j in batch if not j.cancelled.is_set()]
            with self._cv:
                self._served["requests"] += len(batch)
                self._served["batches"] += bool(batch)
                self._served["largest_batch"] = max(self._served["largest_batch"], len(batch))
            try:
                if batch:
                    self._run(batch)
            except NvilaError as e:
                for job in batch:
                    job.emit("error", e)
            except Exception as e:  # a bug: report it to every client of the batch, keep serving
                for job in batch:
                    job.emit("error", e)
            finally:
                with self._cv:
                    self._running = 0

    def _run(self, batch: list[Job]) -> None:
        pipe = self.pipe
        embeds = [pipe.embed(job.prompt) for job in batch]
        trims = [Trim() for _ in batch]
        steps = pipe.decode(embeds, [j.params for j in batch])
        live = [True] * len(batch)
        for step in steps:
            for b, job in enumerate(batch):
                if not live[b]:
                    continue
                if job.cancelled.is_set():      # client gone: no more tokens for it
                    live[b] = False
                    continue
                if step.tokens[b] is not None:
                    job.completion_tokens += 1
                piece = trims[b].push(step.pieces[b])
                if piece:
                    job.emit("text", piece)
                if step.finished[b]:
                    live[b] = False
                    job.finish_reason = step.finished[b]
                    job.emit("done", None)
            if not any(live):
                steps.close()
                break
