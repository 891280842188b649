"""The model behind ``gpt2-instruct serve``: one worker thread owns it and batches requests.

Torch on the CPU gains nothing from two threads decoding at once (each op already uses every
core) and a model shared by threads needs care, so exactly one thread runs the model. Requests
queue up; while a batch decodes, the next one gathers. Greedy requests (temperature 0) that
fit the context together share a batch: ``generation.generate`` gives each row the answer it
would get alone. A sampled request always decodes alone, because a batch draws all rows from
one random generator and ``seed`` must give the same answer whoever else is asking.

:class:`TextPipeline` turns a request's tokens into answer text as they come: bytes to UTF-8,
cut before the first ``stop`` string, and (chat) the response extraction of the generate stage.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from gpt2_instruct.cli import ResponseStream, Utf8Stream
from gpt2_instruct.generation import generate
from gpt2_instruct.model import GPTModel
from gpt2_instruct.params import SamplingParams
from gpt2_instruct.tokenizer import Tokenizer

__all__ = ["Engine", "EngineBusy", "Job", "StopScanner", "TextPipeline", "answer_deltas"]


class EngineBusy(RuntimeError):
    """The queue is full; the client should retry later (HTTP 503)."""


class _AllFinished(Exception):
    """Internal: raised from the token callback to end a batch nobody reads any more."""


class StopScanner:
    """Text up to the earliest stop string, for any split of the text into pieces.

    Text that may still become the start of a stop string is held back until that is
    decided, and a stop found later than where a longer stop may yet begin waits too, so
    streaming cuts exactly where cutting the whole text would (``find`` of every stop, the
    smallest index wins).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self._stops = [stop for stop in stops if stop]
        self._held = ""
        self.stopped = False

    def _scan(self, text: str, final: bool) -> str:
        found = [at for stop in self._stops if (at := text.find(stop)) >= 0]
        first_stop = min(found, default=len(text))
        longest = max((len(stop) for stop in self._stops), default=1)
        may_start = next(
            (
                at
                for at in range(max(0, len(text) - longest + 1), len(text))
                if any(stop.startswith(text[at:]) for stop in self._stops)
            ),
            len(text),
        )
        if found and (final or first_stop <= may_start):
            self.stopped, self._held = True, ""
            return text[:first_stop]
        cut = len(text) if final else min(first_stop, may_start)
        self._held = text[cut:]
        return text[:cut]

    def feed(self, text: str) -> str:
        """The part of the text so far that certainly comes before any stop."""
        return "" if self.stopped else self._scan(self._held + text, final=False)

    def finish(self) -> str:
        """What was held back and is not cut off by a stop."""
        return "" if self.stopped else self._scan(self._held, final=True)


class TextPipeline:
    """One request's tokens to answer text: UTF-8 assembly, stop strings, and for chat
    (``style`` given) the same answer extraction as ``generate`` and ``chat``."""

    def __init__(
        self, tokenizer: Tokenizer, stops: Sequence[str], style: str | None, mode: str
    ) -> None:
        self._tokenizer = tokenizer
        self._bytes = Utf8Stream()
        self._stop = StopScanner(stops)
        self._answer = ResponseStream(style, mode) if style is not None else None
        self.tokens = 0  # tokens used for the answer (usage.completion_tokens)
        self.finish_reason: str | None = None  # set by answer_deltas at the end

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended the answer."""
        return self._stop.stopped

    def _clean(self, text: str, last: bool) -> str:
        if self._answer is None:
            return text
        return self._answer.feed(text) + (self._answer.finish() if last else "")

    def feed(self, token: int) -> str:
        """The answer text this token completes (often empty)."""
        if self.stopped:
            return ""
        self.tokens += 1
        data = self._tokenizer.decode_bytes([token]) if token < self._tokenizer.vocab_size else b""
        return self._clean(self._stop.feed(self._bytes.feed(data)), last=self.stopped)

    def finish(self) -> str:
        """The held-back rest of the answer."""
        if self.stopped:
            return ""
        return self._clean(self._stop.feed(self._bytes.finish()) + self._stop.finish(), last=True)


@dataclass(eq=False)
class Job:
    """One request's decoding: the worker delivers token ids, then a finish reason
    (``"stop"`` at EOS, ``"length"`` at ``max_new_tokens``) or an exception."""

    prompt: list[int]
    sampling: SamplingParams
    loop: asyncio.AbstractEventLoop
    results: asyncio.Queue[int | str | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    sent: int = 0  # worker side: tokens delivered

    def deliver(self, item: int | str | BaseException) -> None:
        """Hand an item to the request's event loop (called on the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.results.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody waits for this answer
            self.cancelled.set()

    @property
    def finished(self) -> bool:
        """Whether the worker may stop decoding this row."""
        return self.cancelled.is_set() or self.sent >= self.sampling.max_new_tokens

    def cancel(self) -> None:
        """The answer needs no more tokens (stop string found, client gone)."""
        self.cancelled.set()


class Engine:
    """The model, its tokenizer and prompt style, and the worker thread that decodes."""

    def __init__(
        self,
        model: GPTModel,
        tokenizer: Tokenizer,
        style: str,
        *,
        max_batch: int = 8,
        max_queue: int = 64,
        response_extraction: str = "reference",
    ) -> None:
        self.model, self.tokenizer, self.style = model, tokenizer, style
        self.response_extraction = response_extraction
        self.max_batch, self.max_queue = max_batch, max_queue
        self._pending: collections.deque[Job] = collections.deque()
        self._ready = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.batch_sizes: collections.Counter[int] = collections.Counter()  # size: batches run

    @property
    def context_length(self) -> int:
        return self.model.config.context_length

    def start(self) -> None:
        """Start the worker thread (idempotent)."""
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._work, name="serve-decoder", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Let the running batch finish, fail queued jobs, and join the worker."""
        with self._ready:
            self._stopping = True
            left, self._pending = list(self._pending), collections.deque()
            self._ready.notify_all()
        for job in left:
            job.deliver(RuntimeError("the server is shutting down"))
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, prompt: list[int], sampling: SamplingParams) -> Job:
        """Queue a request; the caller's event loop receives its tokens (:attr:`Job.results`)."""
        job = Job(prompt, sampling, asyncio.get_running_loop())
        with self._ready:
            if len(self._pending) >= self.max_queue:
                raise EngineBusy(f"{self.max_queue} requests are already waiting")
            self._pending.append(job)
            self._ready.notify()
        return job

    def _take_batch(self) -> list[Job] | None:
        """The oldest job and, if it is greedy, the queued greedy jobs that fit beside it."""
        with self._ready:
            while not self._pending and not self._stopping:
                self._ready.wait()
            if self._stopping:
                return None
            batch = [self._pending.popleft()]
            if batch[0].sampling.temperature != 0.0:
                return batch
            longest, most_new = len(batch[0].prompt), batch[0].sampling.max_new_tokens
            for job in list(self._pending):
                if len(batch) >= self.max_batch:
                    break
                new_longest = max(longest, len(job.prompt))
                new_most = max(most_new, job.sampling.max_new_tokens)
                fits = new_longest + new_most <= self.context_length  # no row is cut
                if job.sampling.temperature == 0.0 and fits and not job.cancelled.is_set():
                    batch.append(job)
                    self._pending.remove(job)
                    longest, most_new = new_longest, new_most
            return batch

    def _work(self) -> None:
        """The worker thread: batches until :meth:`stop`; a cancelled job costs nothing."""
        while (batch := self._take_batch()) is not None:
            batch = [job for job in batch if not job.cancelled.is_set()]
            if batch:
                self._decode(batch)

    def _decode(self, batch: list[Job]) -> None:
        """Decode one batch; each row gets its own tokens and finish reason."""
        self.batch_sizes[len(batch)] += 1
        sampling = dataclasses.replace(
            batch[0].sampling, max_new_tokens=max(job.sampling.max_new_tokens for job in batch)
        )
        called: set[int] = set()  # rows the decoder called in the current step
        last_row = -1

        def on_token(row: int, token: int) -> None:
            nonlocal called, last_row
            if row <= last_row:  # a new step: the rows called in the last one are live
                if all(batch[r].finished for r in called):
                    raise _AllFinished
                called = set()
            called.add(row)
            last_row = row
            job = batch[row]
            if not job.finished:
                job.sent += 1
                job.deliver(token)

        try:
            generate(
                self.model,
                [job.prompt for job in batch],
                eos_id=self.tokenizer.eot_id,
                sampling=sampling,
                on_token=on_token,
            )
        except _AllFinished:
            pass
        except Exception as err:  # a model or device failure: every waiting request hears it
            for job in batch:
                job.deliver(RuntimeError(f"generation failed: {type(err).__name__}: {err}"))
            return
        for job in batch:
            job.deliver("length" if job.sent >= job.sampling.max_new_tokens else "stop")


async def answer_deltas(job: Job, pipe: TextPipeline) -> AsyncIterator[str]:
    """The answer's text pieces as they are decoded; sets ``pipe.finish_reason`` at the end
    ("stop": EOS or a stop string, "length": ``max_new_tokens``). The job is cancelled when
    this ends for any reason (a stop string, or the client gone), so no batch runs on for it.
    """
    try:
        while True:
            item = await job.results.get()
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, str):
                reason = item
                break
            if text := pipe.feed(item):
                yield text
            if pipe.stopped:
                reason = "stop"
                break
        if text := pipe.finish():
            yield text
        pipe.finish_reason = reason
    finally:
        job.cancel()
