"""The asyncio job runner: durable, fair, bounded, with timeouts, cancel and resume.

Delivery happens exactly once per job, by this protocol:
1. `submit` writes the job (and the platform event id, for redelivery dedupe) to the database in
   one transaction before the adapter acknowledges the message.
2. A worker generates the answer and stores it on the job (status ANSWERED) before delivery, so
   a crash after generation never generates again.
3. The adapter delivers the answer; then the history turns and status DONE are committed in one
   transaction (`JobStore.complete`), so "reply recorded" and "job done" can never disagree.
4. A crash after the platform accepted the reply but before step 3 committed leaves the job
   ANSWERED; on restart it is delivered again *through the same placeholder*: the adapter
   persisted the placeholder message id in `job.origin` (returned from `send`) before any answer
   text was delivered, and the final delivery edits that message, so the user still sees one
   reply, not two.

Which job a worker starts next is the queue's business (bot/jobqueue.py): in memory for one
process on SQLite, the jobs table under leases for replicas on Postgres (bot/pgqueue.py), where a
job whose replica died is claimed again by another after its lease (step 4 then happens there).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from bot import texts
from bot.adapter import (
    Acceptance,
    Adapter,
    Failed,
    Final,
    Incoming,
    Partial,
    Queued,
    QueueFull,
    ReplyEvent,
    Started,
)
from bot.engine_port import AnswerInterrupted, Engine, EngineNotReady, StreamStats
from bot.history import HistoryStore
from bot.job_hooks import Admission, JobObserver, JobOutcome, OutcomeStatus, PresetResultHook
from bot.jobqueue import JobQueue, LocalJobQueue, positions
from bot.jobs import JobStore, new_job_id
from bot.models import (
    ConversationId,
    GenerationParams,
    InputRejected,
    Job,
    JobStatus,
    Message,
    Part,
    TextPart,
    Turn,
)
from bot.presets import generate_preset, get_preset, parse_preset_command, render_answer

log = logging.getLogger("vlbot.runner")

DEFAULT_JOB_SECONDS = 30.0
NEAR_FRONT = 3  # positions announced on every change
POSITION_UPDATE_S = 20.0  # further back: at most this often


def check_message(message: Message, max_question_chars: int, max_images: int) -> None:
    """The limits every message meets before it is queued (the CLI applies them too)."""
    length = len(message.text)
    if length > max_question_chars:
        raise InputRejected(
            "question_too_long", f"{length} characters", length=length, limit=max_question_chars
        )
    count = len(message.images)
    if count > max_images:
        raise InputRejected("too_many_images", f"{count} images", count=count, limit=max_images)


def with_preset(message: Message, origin: dict[str, Any]) -> tuple[Message, dict[str, Any]]:
    """A message that starts with a preset command ("/triage what broke?", "ocr: …") runs that
    preset: the command moves from the text to origin["preset"], the same for every adapter."""
    if origin.get("preset") or not message.text:
        return message, origin
    preset, rest = parse_preset_command(message.text)
    if preset is None:
        return message, origin
    parts: list[Part] = [p for p in message.parts if not isinstance(p, TextPart)]
    if rest:
        parts.append(TextPart(rest))
    return Message(tuple(parts)), {**origin, "preset": preset.name}


@dataclass
class _Measured:
    """What the runner measured of one job while it ran (see JobOutcome)."""

    engine_s: float = 0.0
    generation_started: float = 0.0
    first_token_s: float | None = None
    visual_tokens: int | None = None


class Runner:
    def __init__(
        self,
        jobs: JobStore,
        history: HistoryStore,
        engine: Engine,
        *,
        max_concurrency: int = 1,
        max_queue: int = 100,
        job_timeout_s: float = 300.0,
        max_attempts: int = 3,
        retry_backoff_s: float = 2.0,
        max_images_per_message: int = 10,
        max_question_chars: int = 4000,
        params: GenerationParams | None = None,
        queue: JobQueue | None = None,
        admission: Admission | None = None,
        observers: Sequence[JobObserver] = (),
        result_hooks: Sequence[PresetResultHook] = (),
    ) -> None:
        self.jobs = jobs
        self.history = history
        self.engine = engine
        self.max_concurrency = max(1, max_concurrency)
        self.max_queue = max_queue
        self.job_timeout_s = job_timeout_s
        self.max_attempts = max(1, max_attempts)
        self.retry_backoff_s = retry_backoff_s
        self.max_images_per_message = max_images_per_message
        self.max_question_chars = max_question_chars
        self.params = params or GenerationParams()
        self.adapters: dict[str, Adapter] = {}
        self._queue: JobQueue = queue if queue is not None else LocalJobQueue()
        self._admitting = 0  # submits past the capacity check whose job is not queued yet
        self._wakeup = asyncio.Event()
        self._running: dict[str, tuple[Job, asyncio.Task[None]]] = {}
        self._cancelled: set[str] = set()
        self._workers: list[asyncio.Task[None]] = []
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._durations: deque[float] = deque(maxlen=20)
        self._stopping = False
        # job id → (position last announced, when): position updates are rate-limited
        self._sent_positions: dict[str, tuple[int, float]] = {}
        self.admission = admission
        self.observers = list(observers)
        self.result_hooks = list(result_hooks)
        # job id → what this process measured of it so far, for its JobOutcome
        self._measured: dict[str, _Measured] = {}
        self._admission_locks: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = (
            weakref.WeakValueDictionary()
        )

    def attach(self, adapters: Mapping[str, Adapter]) -> None:
        self.adapters.update(adapters)

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Resume unfinished jobs from the database (the source of truth: jobs submitted before
        `start` are there too), then start the workers."""
        self._stopping = False
        await self._queue.start()
        # a shared queue resumes through claims: a job left by a dead replica (this one before a
        # restart included) is claimed again when its lease has run out
        for job in [] if self._queue.shared else await self.jobs.unfinished():
            if job.status is JobStatus.ANSWERED:
                self._spawn(self._deliver(job))
            elif job.attempts >= self.max_attempts:
                await self._fail(job, "failed", "gave up after a restart during generation")
            else:
                self._queue.push(job)
        if len(self._queue) and not self._queue.shared:
            log.info("resumed %d unfinished jobs", len(self._queue))
        self._workers = [
            asyncio.create_task(self._worker(), name=f"vlbot-worker-{i}")
            for i in range(self.max_concurrency)
        ]
        self._announce_positions()

    async def stop(self, grace_s: float = 10.0) -> None:
        """Stop taking work. Running jobs get `grace_s` to finish; the rest stay queued in the
        database and resume at the next start. Nothing accepted is lost."""
        self._stopping = True
        self._wakeup.set()
        running = [task for _, task in self._running.values()]
        if running:
            await asyncio.wait(running, timeout=grace_s)
        for task in [*self._workers, *(t for _, t in self._running.values()), *self._side_tasks]:
            task.cancel()
        await asyncio.gather(*self._workers, *self._side_tasks, return_exceptions=True)
        self._workers.clear()
        await self._queue.stop()

    # --- the Core interface adapters use -----------------------------------------------------

    async def submit(self, incoming: Incoming) -> Acceptance:
        try:
            return await self._submit(incoming)
        except InputRejected as exc:
            self._spawn(self._observe(JobOutcome.rejected(incoming, exc.code)))
            raise
        except QueueFull:
            self._spawn(self._observe(JobOutcome.rejected(incoming, "queue_full")))
            raise

    async def _submit(self, incoming: Incoming) -> Acceptance:
        if not incoming.message.parts:
            raise InputRejected("empty_question", "empty message")
        check_message(incoming.message, self.max_question_chars, self.max_images_per_message)
        # Admission is one step: the slot is taken here, before the first await (the image
        # check, the SQLite write), so concurrent submits cannot all pass the capacity check; it
        # is given back if the image is refused, the write fails or is cancelled, or the event
        # is a duplicate. A refused submit costs nothing: images are decoded only after this.
        if self.queue_depth >= self.max_queue:
            raise QueueFull(self.queue_depth, self.retry_after_s())
        self._admitting += 1
        try:
            # one user's messages are admitted one at a time: a quota then sees the job
            # written before it checks the next
            async with self._admission_lock(incoming):
                if self.admission is not None:  # quotas: refused here, nothing is queued
                    await self.admission.admit(incoming)
                if incoming.message.images:  # decodes every image: off the event loop
                    await asyncio.to_thread(self.engine.check, incoming.message)
                else:
                    self.engine.check(incoming.message)
                message, origin = with_preset(incoming.message, dict(incoming.origin))
                job = Job(
                    id=new_job_id(),
                    conversation=incoming.conversation,
                    message=message,
                    user=incoming.user,
                    origin=origin,
                )
                # on a shared queue the job is held until its acknowledgement is sent (below): the
                # replica that runs it then finds the placeholder this one recorded
                held = time.time() + self._queue.hold_s if self._queue.hold_s else None
                inserted = await self.jobs.insert(
                    job, incoming.event_key, pinned_to=self._pin(incoming), held_until=held
                )
            if inserted:
                self._queue.push(job)
        finally:
            self._admitting -= 1
        if not inserted:
            log.info("duplicate event %s ignored", incoming.event_key)
            return Acceptance(job_id="", position=0, eta_s=0.0, duplicate=True)
        position = positions(self._queue).get(job.id, 1)
        log.info("job %s accepted for %s (position %d)", job.id, job.conversation, position)
        acceptance = Acceptance(job.id, position, self.eta_s(position))
        self._sent_positions[job.id] = (position, time.monotonic())
        if held is None:
            self._wakeup.set()
            self._spawn(self._emit(job, Queued(position, acceptance.eta_s)))
        else:
            await self._emit(job, Queued(position, acceptance.eta_s))
            try:
                await self._queue.ready(job)
            except Exception as exc:  # the hold then ends with its lease
                log.warning("job %s: could not release its hold: %r", job.id, exc)
            self._wakeup.set()
        return acceptance

    async def cancel(self, conversation: ConversationId) -> int:
        key = conversation.key()
        removed = await self._queue.remove(key)
        for job in removed:
            await self._fail(job, "cancelled", "cancelled by the user", JobStatus.CANCELLED)
        count = len(removed)
        if key in self._running:
            job, task = self._running[key]
            self._cancelled.add(job.id)
            task.cancel()
            count += 1
        self._announce_positions()
        return count

    async def reset(self, conversation: ConversationId) -> None:
        await self.cancel(conversation)
        await self.history.reset(conversation)

    def _admission_lock(self, incoming: Incoming) -> asyncio.Lock:
        key = (incoming.conversation.platform, incoming.user.platform_id)
        lock = self._admission_locks.get(key)
        if lock is None:  # weakly held: gone once no submit of that user is under way
            lock = self._admission_locks[key] = asyncio.Lock()
        return lock

    def _pin(self, incoming: Incoming) -> str | None:
        """The replica an adapter's job must run on while it lives: an HTTP client waits for
        its stream on the connection it holds here (another replica could not reach it)."""
        adapter = self.adapters.get(incoming.conversation.platform)
        return self._queue.replica_id if getattr(adapter, "connection_bound", False) else None

    # --- estimates ---------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Jobs waiting, counting those being written to the database right now."""
        return len(self._queue) + self._admitting

    @property
    def running_count(self) -> int:
        return len(self._running)

    def job_seconds(self) -> float:
        return sum(self._durations) / len(self._durations) if self._durations else DEFAULT_JOB_SECONDS

    def eta_s(self, position: int) -> float | None:
        """Seconds until the answer of the job at `position` (1 = next) is complete; None until
        a job has been timed (no invented estimate: the place in line is shown alone)."""
        if not self._durations:
            return None
        rounds = math.ceil(max(position, 1) / self.max_concurrency)
        return (rounds + (1 if self._running else 0)) * self.job_seconds()

    def retry_after_s(self) -> float:
        return max(1.0, math.ceil(self.job_seconds() / self.max_concurrency))

    # --- workers -----------------------------------------------------------------------------

    async def _worker(self) -> None:
        while not self._stopping:
            try:
                job = await self._queue.claim()
            except Exception as exc:  # the shared database is away: try again shortly
                log.warning("could not claim a job: %r", exc)
                job = None
            if job is None:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self._queue.poll_s)
                continue
            key = job.conversation.key()
            task = asyncio.create_task(self._start(job), name=f"vlbot-job-{job.id}")
            self._running[key] = (job, task)
            self._announce_positions()
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if self._stopping:  # the worker itself is being stopped
                    if not task.done():
                        task.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await task
                    raise
                # only the job was cancelled (it ended before it could record that): go on
                log.warning("job %s was cancelled outside its handler", job.id)
            finally:
                self._running.pop(key, None)
                with contextlib.suppress(Exception):
                    await self._queue.release(job)
                self._wakeup.set()

    async def _start(self, job: Job) -> None:
        """A claimed job: an answer already generated is delivered (a replica died before it
        was), a job out of attempts fails, any other runs."""
        if job.status is JobStatus.ANSWERED:
            await self._deliver(job)
        elif job.attempts >= self.max_attempts:
            await self._fail(job, "failed", "gave up after a restart during generation")
        else:
            await self._run(job)

    async def _run(self, job: Job) -> None:
        try:
            job = await self.jobs.update(job, status=JobStatus.RUNNING, attempts=job.attempts + 1)
            await self._emit(job, Started())
            if not self.engine.ready:
                await self.engine.load()  # idempotent: waits for the load already under way
            started = time.monotonic()  # a job's time, without the model's load
            measured = self._measured.setdefault(job.id, _Measured())
            measured.generation_started = started
            try:
                answer = await asyncio.wait_for(self._generate(job), timeout=self.job_timeout_s)
            finally:
                measured.engine_s += time.monotonic() - started
        except asyncio.CancelledError:
            if job.id in self._cancelled:
                self._cancelled.discard(job.id)
                await self._fail(job, "cancelled", "cancelled by the user", JobStatus.CANCELLED)
                return
            # shutdown: back to the queue in the database, this attempt not counted
            await self.jobs.update(job, status=JobStatus.QUEUED, attempts=job.attempts - 1)
            raise
        except asyncio.TimeoutError:
            log.warning("job %s timed out after %.0f s", job.id, self.job_timeout_s)
            await self._fail(job, "timeout", f"timed out after {self.job_timeout_s:.0f} s")
            return
        except InputRejected as exc:
            await self._fail(job, exc.code, exc.detail, params=exc.params)
            return
        except Exception as exc:  # engine fault: retry with backoff, then report
            log.error("job %s attempt %d failed: %r", job.id, job.attempts, exc, exc_info=exc)
            # an engine error may name its user-facing text (e.g. remote_timeout) by `code`
            code = getattr(exc, "code", None)
            code = code if isinstance(code, str) else "failed"
            # not retried: still loading, or an answer broken off mid-stream (a retry would
            # show its beginning twice)
            retry = not isinstance(exc, (EngineNotReady, AnswerInterrupted))
            if job.attempts < self.max_attempts and retry:
                self._spawn(self._retry_later(job, self.retry_backoff_s * 2 ** (job.attempts - 1)))
            else:
                await self._fail(job, code, f"{type(exc).__name__}: {exc}")
            return
        self._durations.append(time.monotonic() - started)
        final = self._final(job, answer)
        job = await self.jobs.update(job, status=JobStatus.ANSWERED, answer=answer)
        await self._deliver(job, final)

    def _final(self, job: Job, answer: str) -> Final:
        """The answer with what the engine measured of it: the prompt's real token count and
        whether max_new_tokens cut it (an engine without `take_stats` reports neither)."""
        take_stats = getattr(self.engine, "take_stats", None)
        stats = take_stats(job.conversation.key()) if take_stats is not None else None
        if not isinstance(stats, StreamStats):
            return Final(answer)
        measured = self._measured.setdefault(job.id, _Measured())
        measured.visual_tokens = stats.visual_tokens
        return Final(answer, stats.finish_reason, stats.prompt_tokens, stats.completion_tokens)

    async def _generate(self, job: Job) -> str:
        history = await self.history.recent(job.conversation)
        params = self.params_for(job)
        lang = job.user.language_code
        take_notice = getattr(self.engine, "take_notice", None)  # engine=auto fell back to OCR
        json_only = bool(job.origin.get("json_only"))  # an API client parses the answer as JSON
        notice = take_notice(job.conversation.key()) if take_notice and not json_only else None
        text = f"{texts.text(notice, lang)}\n\n" if notice else ""
        if text:
            await self._emit(job, Partial(text, text))
        preset = get_preset(job.origin.get("preset") or "")
        if preset is not None:  # validated JSON: no partial text (it would be raw JSON)
            result = await generate_preset(
                self.engine, history, job.message, params, preset,
                user_text=job.message.text, language_code=lang,
            )
            self._first_piece(job)
            notes = await self._preset_notes(job, preset.name, result.as_dict())
            return text + render_answer(result, lang, json_only=json_only, note=notes)
        return await self._stream(job, history, params, text)

    async def _stream(
        self, job: Job, history: list[Turn], params: GenerationParams, text: str = ""
    ) -> str:
        stream = self.engine.stream(history, job.message, params)
        async with contextlib.aclosing(stream):  # a timeout or cancel stops the generation
            async for piece in stream:
                if not piece:
                    continue
                text += piece
                self._first_piece(job)
                await self._emit(job, Partial(text, piece))
        return text.strip()

    def params_for(self, job: Job) -> GenerationParams:
        """The runner's defaults, with what the request asked for (origin["params"]) within them:
        max_new_tokens never above the configured limit."""
        asked = job.origin.get("params") or {}
        params = replace(self.params, session=job.conversation.key())
        if isinstance(asked.get("max_new_tokens"), int) and asked["max_new_tokens"] > 0:
            params = replace(
                params, max_new_tokens=min(asked["max_new_tokens"], self.params.max_new_tokens)
            )
        if isinstance(asked.get("temperature"), (int, float)) and asked["temperature"] >= 0:
            params = replace(params, temperature=float(asked["temperature"]))
        return params

    async def _retry_later(self, job: Job, delay_s: float) -> None:
        await asyncio.sleep(delay_s)
        fresh = await self.jobs.get(job.id)
        if fresh is None or fresh.status.finished:
            return
        self._queue.push(await self.jobs.update(fresh, status=JobStatus.QUEUED), front=True)
        self._wakeup.set()

    async def _deliver(self, job: Job, final: Final | None = None, tries: int = 5) -> None:
        assert job.answer is not None
        for attempt in range(tries):
            try:
                await self._send(job, final or Final(job.answer))
                break
            except Exception as exc:
                log.warning("job %s delivery attempt %d failed: %r", job.id, attempt + 1, exc)
                await asyncio.sleep(min(30.0, 2.0**attempt))
        else:
            await self._settled(job, "failed", "undelivered", final)
            await self.jobs.finish(job, JobStatus.FAILED, "the answer could not be delivered")
            return
        # the outcome is recorded before the job leaves the unsettled ones (quotas count a job
        # from the jobs table until the ledger has it: never in neither place)
        await self._settled(job, "answered", None, final)
        await self.jobs.complete(job)
        log.info("job %s done", job.id)

    async def _fail(
        self,
        job: Job,
        code: str,
        detail: str,
        status: JobStatus = JobStatus.FAILED,
        params: dict[str, object] | None = None,
    ) -> None:
        await self._settled(job, "cancelled" if status is JobStatus.CANCELLED else "failed", code)
        job = await self.jobs.finish(job, status, detail)
        await self._emit(job, Failed(code, job.id, dict(params or {})))

    # --- hooks (bot/job_hooks.py) --------------------------------------------------------------

    def _first_piece(self, job: Job) -> None:
        measured = self._measured.get(job.id)
        if measured is not None and measured.first_token_s is None:
            measured.first_token_s = time.monotonic() - measured.generation_started

    async def _preset_notes(self, job: Job, preset: str, result: dict[str, Any]) -> str:
        notes: list[str] = []
        for hook in self.result_hooks:
            try:
                note = await hook.preset_result(job, preset, result)
            except Exception as exc:  # a hook never costs the user the answer
                log.error("job %s: preset hook %s failed: %r", job.id, type(hook).__name__, exc,
                          exc_info=exc)
                continue
            if note:
                notes.append(note)
        return "\n".join(notes)

    async def _settled(
        self, job: Job, status: OutcomeStatus, reason: str | None, final: Final | None = None
    ) -> None:
        measured = self._measured.pop(job.id, None) or _Measured()
        await self._observe(JobOutcome(
            conversation=job.conversation,
            user=job.user,
            origin=dict(job.origin),
            status=status,
            images=len(job.message.images),
            job_id=job.id,
            reason=reason,
            engine_s=measured.engine_s,
            first_token_s=measured.first_token_s,
            prompt_tokens=final.prompt_tokens if final else None,
            completion_tokens=final.completion_tokens if final else None,
            visual_tokens=measured.visual_tokens,
        ))

    async def _observe(self, outcome: JobOutcome) -> None:
        for observer in self.observers:
            try:
                await observer.job_finished(outcome)
            except Exception as exc:  # the ledger never fails a job
                log.error("observer %s failed: %r", type(observer).__name__, exc, exc_info=exc)

    # --- talking to adapters -----------------------------------------------------------------

    async def _send(self, job: Job, event: ReplyEvent) -> None:
        adapter = self.adapters.get(job.conversation.platform)
        if adapter is None:
            raise LookupError(f"no adapter for platform {job.conversation.platform!r}")
        changes = await adapter.send(job, event)
        if changes:
            merged = {**job.origin, **changes}
            if merged != job.origin:
                stored = await self.jobs.merge_origin(job.id, changes)
                job.origin.update(stored)  # the runner's copy sees it too (dict is shared)

    async def _emit(self, job: Job, event: ReplyEvent) -> None:
        """Send a progress event; a platform error here never fails the job."""
        try:
            await self._send(job, event)
        except Exception as exc:
            log.warning("job %s: %s not delivered: %r", job.id, type(event).__name__, exc)

    def _announce_positions(self) -> None:
        """Tell queued jobs their new place in line. With a long queue every start moves every
        job, and one edit per job per start would flood the platforms' rate limits (and delay
        the answers behind them): a job hears of a change at once only when it is near the
        front, otherwise at most every POSITION_UPDATE_S seconds."""
        order = self._queue.predicted_order()
        queued = {job.id for job in order}
        for job_id in [j for j in self._sent_positions if j not in queued]:
            del self._sent_positions[job_id]  # started or gone: no more position updates
        now = time.monotonic()
        for position, job in enumerate(order, start=1):
            last = self._sent_positions.get(job.id)
            if last is None or (
                last[0] != position
                and (position <= NEAR_FRONT or now - last[1] >= POSITION_UPDATE_S)
            ):
                self._sent_positions[job.id] = (position, now)
                self._spawn(self._emit_waiting(job, Queued(position, self.eta_s(position))))

    async def _emit_waiting(self, job: Job, event: Queued) -> None:
        """A new place in line, sent only while the job still waits: with replicas another one
        may have started (even answered) it meanwhile, and this edit must not come after."""
        try:
            async with self._queue.still_waiting(job) as waiting:
                if waiting:
                    await self._emit(job, event)
        except Exception as exc:
            log.warning("job %s: place in line not sent: %r", job.id, exc)

    def _spawn(self, coro: object) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro)  # type: ignore[arg-type]
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)
