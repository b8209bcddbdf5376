"""The job runner: order, fairness, bounds, timeouts, cancel, retries, durability."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bot.adapter import Acceptance, Failed, Final, Partial, Queued, QueueFull
from bot.models import ImagePart, JobStatus, Role
from tests.conftest import Stack, make_stack
from tests.fakes import ScriptedEngine, incoming

RECEIPT = ImagePart(b"\x89PNG fake receipt bytes", "image/png", "receipt.png")


async def test_turns_of_one_conversation_run_in_order_one_at_a_time(stack: Stack) -> None:
    stack.engine.delay_s = 0.01
    stack.runner.max_concurrency = 3
    await stack.runner.start()
    for i in range(4):
        await stack.runner.submit(incoming("a", f"question {i}"))
    finals = await stack.adapter.wait_for_finals(4)
    assert [f.event.text for f in finals] == [f"answer to: question {i}" for i in range(4)]  # type: ignore[union-attr]
    assert stack.engine.max_running == 1


async def test_a_chatty_conversation_does_not_starve_the_others(stack: Stack) -> None:
    stack.engine.delay_s = 0.005
    for i in range(10):
        await stack.runner.submit(incoming("chatty", f"c{i}"))
    for chat in ("b", "x", "d", "e"):
        await stack.runner.submit(incoming(chat, f"{chat}0"))
    await stack.runner.start()
    finals = await stack.adapter.wait_for_finals(14)
    order = [f.conversation.split(":")[1] for f in finals]
    # round robin: every quiet chat is answered among the first five answers
    assert sorted(order[:5]) == ["b", "chatty", "d", "e", "x"]
    chatty = [f.event.text for f in finals if f.conversation == "test:chatty"]  # type: ignore[union-attr]
    assert chatty == [f"answer to: c{i}" for i in range(10)]


async def test_queue_positions_are_announced(stack: Stack) -> None:
    accepted = [await stack.runner.submit(incoming(c, "q")) for c in ("a", "b", "c")]
    assert [a.position for a in accepted] == [1, 2, 3]
    await asyncio.sleep(0.05)
    queued = [s.event for s in stack.adapter.sent if isinstance(s.event, Queued)]
    assert sorted(q.position for q in queued) == [1, 2, 3]


async def test_no_invented_estimate_before_a_job_was_timed_then_measured_ones(
    stack: Stack,
) -> None:
    stack.engine.delay_s = 0.02
    stack.engine.reply = lambda h, m: "one two three four five"  # at least 5 x 20 ms a job
    first = [await stack.runner.submit(incoming(c, "q")) for c in ("a", "b")]
    assert [a.eta_s for a in first] == [None, None]  # nothing timed yet: the place in line only
    await asyncio.sleep(0.05)
    assert {s.event.eta_s for s in stack.adapter.sent if isinstance(s.event, Queued)} == {None}
    await stack.runner.start()
    await stack.adapter.wait_for_finals(2)
    while stack.runner.running_count:  # noqa: ASYNC110 (the last delivery is being recorded)
        await asyncio.sleep(0.01)
    later = [await stack.runner.submit(incoming(c, "q")) for c in ("c", "d")]
    measured = stack.runner.job_seconds()
    assert 0.1 <= measured < 30  # the jobs' own time, not the 30 s default
    assert later[0].eta_s == pytest.approx(measured)  # next in line, nothing running yet
    assert later[1].eta_s is not None and later[1].eta_s > later[0].eta_s


async def test_full_queue_gets_a_busy_reply_not_a_silent_drop(stack: Stack) -> None:
    stack.runner.max_queue = 2
    await stack.runner.submit(incoming("a", "1"))
    await stack.runner.submit(incoming("b", "2"))
    with pytest.raises(QueueFull) as busy:
        await stack.runner.submit(incoming("c", "3"))
    assert busy.value.queued == 2 and busy.value.retry_after_s >= 1
    assert (await stack.jobs.counts()) == {"queued": 2}


async def test_a_burst_of_concurrent_submits_admits_only_max_queue(stack: Stack) -> None:
    stack.runner.max_queue = 3
    results = await asyncio.gather(
        *(stack.runner.submit(incoming(f"c{i}", f"q{i}")) for i in range(30)),
        return_exceptions=True,
    )
    accepted = [r for r in results if isinstance(r, Acceptance)]
    busy = [r for r in results if isinstance(r, QueueFull)]
    assert len(accepted) == 3 and len(busy) == 27
    assert sorted(a.position for a in accepted) == [1, 2, 3]
    assert all(b.queued == 3 for b in busy)
    assert await stack.jobs.counts() == {"queued": 3}
    await stack.runner.start()
    finals = await stack.adapter.wait_for_finals(3)
    assert all(isinstance(f.event, Final) for f in finals)


async def test_a_refused_submit_decodes_nothing_and_a_refused_image_frees_its_slot(
    stack: Stack,
) -> None:
    from bot.models import InputRejected, Message

    stack.runner.max_queue = 2
    checked: list[str] = []

    def check(message: Message) -> None:  # the engine's image check (a full decode)
        checked.append(message.text)
        if message.text == "damaged":
            raise InputRejected("corrupt_image", "cannot decode")

    stack.engine.check = check  # type: ignore[method-assign]
    with pytest.raises(InputRejected):
        await stack.runner.submit(incoming("a", "damaged", RECEIPT))
    results = await asyncio.gather(
        *(stack.runner.submit(incoming(f"c{i}", f"q{i}", RECEIPT)) for i in range(10)),
        return_exceptions=True,
    )
    assert sum(isinstance(r, Acceptance) for r in results) == 2
    assert sum(isinstance(r, QueueFull) for r in results) == 8
    assert len(checked) == 3  # the damaged one and the two admitted: the busy ones cost nothing


async def test_a_failed_or_duplicate_write_gives_its_queue_slot_back(stack: Stack) -> None:
    stack.runner.max_queue = 1
    write = stack.jobs.insert

    async def broken_disk(job: object, event_key: str | None = None, **_: object) -> bool:
        raise OSError("disk I/O error")

    stack.jobs.insert = broken_disk  # type: ignore[assignment,method-assign]
    with pytest.raises(OSError):
        await stack.runner.submit(incoming("a", "lost"))
    stack.jobs.insert = write  # type: ignore[method-assign]
    assert stack.runner.queue_depth == 0
    await stack.runner.start()
    await stack.runner.submit(incoming("a", "kept", event="update:1"))
    await stack.adapter.wait_for_finals(1)
    again = await stack.runner.submit(incoming("a", "kept", event="update:1"))
    assert again.duplicate and stack.runner.queue_depth == 0
    await stack.runner.submit(incoming("b", "room for this one"))
    assert [f.conversation for f in await stack.adapter.wait_for_finals(2)] == ["test:a", "test:b"]


async def test_a_hanging_job_times_out_and_others_go_on(stack: Stack) -> None:
    stack.runner.job_timeout_s = 0.3
    stack.engine.hang = True
    await stack.runner.start()
    await stack.runner.submit(incoming("a", "hang"))
    finals = await stack.adapter.wait_for_finals(1)
    assert isinstance(finals[0].event, Failed) and finals[0].event.code == "timeout"
    stack.engine.hang = False
    await stack.runner.submit(incoming("b", "fine"))
    finals = await stack.adapter.wait_for_finals(2)
    assert isinstance(finals[1].event, Final)


async def test_cancel_stops_running_and_queued_jobs_of_one_conversation(stack: Stack) -> None:
    stack.engine.hang = True
    await stack.runner.start()
    await stack.runner.submit(incoming("a", "first"))
    await stack.runner.submit(incoming("a", "second"))
    await asyncio.sleep(0.05)
    assert await stack.runner.cancel(incoming("a", "").conversation) == 2
    finals = await stack.adapter.wait_for_finals(2)
    assert {f.event.code for f in finals} == {"cancelled"}  # type: ignore[union-attr]
    assert (await stack.jobs.counts()) == {"cancelled": 2}
    stack.engine.hang = False
    await stack.runner.submit(incoming("b", "other chat"))
    assert isinstance((await stack.adapter.wait_for_finals(3))[2].event, Final)


async def test_engine_fault_is_retried_then_reported_with_a_reference(stack: Stack) -> None:
    stack.engine.fail_times = 1
    await stack.runner.start()
    await stack.runner.submit(incoming("a", "flaky"))
    finals = await stack.adapter.wait_for_finals(1)
    assert isinstance(finals[0].event, Final)

    stack.engine.fail_times = 10
    accepted = await stack.runner.submit(incoming("b", "broken"))
    finals = await stack.adapter.wait_for_finals(2)
    failed = finals[1].event
    assert isinstance(failed, Failed) and failed.code == "failed" and failed.ref == accepted.job_id
    job = await stack.jobs.get(accepted.job_id)
    assert job is not None and job.status is JobStatus.FAILED and job.attempts == 3


async def test_follow_up_sees_earlier_turns_and_their_image(stack: Stack) -> None:
    await stack.runner.start()
    await stack.runner.submit(incoming("a", "What is on this receipt?", RECEIPT))
    await stack.adapter.wait_for_finals(1)
    await stack.runner.submit(incoming("a", "and what's the total?"))
    await stack.adapter.wait_for_finals(2)
    history = stack.engine.calls[1].history
    assert [t.role for t in history] == [Role.USER, Role.ASSISTANT]
    assert history[0].images[0].data == RECEIPT.data
    assert history[1].text == "answer to: What is on this receipt?"


async def test_a_redelivered_event_is_answered_once(stack: Stack) -> None:
    await stack.runner.start()
    first = await stack.runner.submit(incoming("a", "hi", event="update:7"))
    again = await stack.runner.submit(incoming("a", "hi", event="update:7"))
    assert not first.duplicate and again.duplicate
    await stack.adapter.wait_for_finals(1)
    await asyncio.sleep(0.1)
    assert len(stack.adapter.finals()) == 1


async def test_a_failed_delivery_is_retried_and_sent_once(stack: Stack) -> None:
    stack.adapter.fail_next_final = 1
    await stack.runner.start()
    await stack.runner.submit(incoming("a", "hi"))
    finals = await stack.adapter.wait_for_finals(1, timeout=10)
    await asyncio.sleep(0.1)
    assert len(finals) == 1 and isinstance(finals[0].event, Final)
    assert len(await stack.history.recent(incoming("a", "").conversation)) == 2


async def test_jobs_accepted_before_a_crash_are_answered_once_after_restart(tmp_path: Path) -> None:
    db_path = tmp_path / "vlbot.sqlite3"
    first = await make_stack(db_path)
    for chat in ("a", "b", "a"):
        await first.runner.submit(incoming(chat, f"q-{chat}"))
    # a job whose answer was generated but whose delivery was not recorded:
    answered = await first.runner.submit(incoming("c", "q-c"))
    job = await first.jobs.get(answered.job_id)
    assert job is not None
    await first.jobs.update(job, status=JobStatus.ANSWERED, answer="stored answer",
                            origin={**job.origin, "placeholder": 99})
    await first.db.close()  # the process "dies" here: runner never started

    second = await make_stack(db_path)
    await second.runner.start()
    finals = await second.adapter.wait_for_finals(4)
    await asyncio.sleep(0.1)
    assert len(second.adapter.finals()) == 4
    assert sorted(f.conversation for f in finals) == ["test:a", "test:a", "test:b", "test:c"]
    stored = next(f for f in finals if f.conversation == "test:c")
    assert isinstance(stored.event, Final) and stored.event.text == "stored answer"
    assert len(second.engine.calls) == 3  # the stored answer was not generated again
    assert (await second.jobs.counts()) == {"done": 4}
    await second.runner.stop()
    await second.db.close()


async def test_history_persists_into_a_new_process(tmp_path: Path) -> None:
    db_path = tmp_path / "vlbot.sqlite3"
    s = await make_stack(db_path)
    await s.runner.start()
    await s.runner.submit(incoming("a", "What is on this receipt?", RECEIPT))
    await s.adapter.wait_for_finals(1)
    await s.runner.stop()
    await s.db.close()
    script = textwrap.dedent(f"""
        import asyncio
        from pathlib import Path
        from bot.db import Database
        from bot.history import HistoryStore
        from bot.models import ConversationId
        async def main():
            db = await Database.open(Path({str(db_path)!r}))
            turns = await HistoryStore(db).recent(ConversationId("test", "a"))
            print(len(turns), turns[0].images[0].name, len(turns[0].images[0].data), turns[1].text)
            await db.close()
        asyncio.run(main())
    """)
    out = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    assert out.stdout.split(None, 3) == ["2", "receipt.png", str(len(RECEIPT.data)),
                                          "answer to: What is on this receipt?\n"]


async def test_shutdown_keeps_the_running_job_queued(tmp_path: Path) -> None:
    db_path = tmp_path / "vlbot.sqlite3"
    s = await make_stack(db_path, ScriptedEngine(hang=True))
    await s.runner.start()
    await s.runner.submit(incoming("a", "long one"))
    await asyncio.sleep(0.05)
    await s.runner.stop(grace_s=0.1)
    assert (await s.jobs.counts()) == {"queued": 1}
    await s.db.close()
    again = await make_stack(db_path)
    await again.runner.start()
    finals = await again.adapter.wait_for_finals(1)
    event = finals[0].event
    assert isinstance(event, Final) and event.text == "answer to: long one"
    await again.runner.stop()
    await again.db.close()


async def test_too_many_images_or_an_empty_message_is_refused_before_queueing(stack: Stack) -> None:
    from bot.adapter import Incoming
    from bot.models import InputRejected, Message

    stack.runner.max_images_per_message = 2
    with pytest.raises(InputRejected) as many:
        await stack.runner.submit(incoming("a", "three?", RECEIPT, RECEIPT, RECEIPT))
    assert many.value.code == "too_many_images" and many.value.params == {"count": 3, "limit": 2}
    empty = incoming("a", "")
    with pytest.raises(InputRejected) as nothing:
        await stack.runner.submit(Incoming(empty.conversation, empty.user, Message(())))
    assert nothing.value.code == "empty_question"
    with pytest.raises(InputRejected) as long:
        await stack.runner.submit(incoming("a", "x" * 100_000))
    assert long.value.code == "question_too_long" and long.value.params["limit"] == 4000
    assert await stack.jobs.counts() == {}


async def test_cancel_while_the_start_is_being_announced_keeps_the_runner_alive(
    stack: Stack,
) -> None:
    from bot.adapter import Started

    stack.engine.hang = True
    record = stack.adapter.send

    async def slow_start(job: object, event: object) -> object:
        if isinstance(event, Started):
            await asyncio.sleep(0.5)
        return await record(job, event)  # type: ignore[arg-type]

    stack.adapter.send = slow_start  # type: ignore[method-assign]
    await stack.runner.start()
    await stack.runner.submit(incoming("a", "hi"))
    await asyncio.sleep(0.1)  # the job is inside send(Started)
    assert await stack.runner.cancel(incoming("a", "").conversation) == 1
    finals = await stack.adapter.wait_for_finals(1)
    assert isinstance(finals[0].event, Failed) and finals[0].event.code == "cancelled"
    stack.engine.hang = False
    await stack.runner.submit(incoming("b", "still serving?"))
    assert isinstance((await stack.adapter.wait_for_finals(2))[1].event, Final)
    for _ in range(100):  # DONE is committed right after the delivery
        if await stack.jobs.counts() == {"cancelled": 1, "done": 1}:
            break
        await asyncio.sleep(0.05)
    assert await stack.jobs.counts() == {"cancelled": 1, "done": 1}


async def test_a_preset_command_runs_the_preset_through_the_runner(stack: Stack) -> None:
    from tests.test_presets import GOOD

    calls = 0

    def reply(history: object, message: object) -> str:
        nonlocal calls
        calls += 1
        return "not json at all" if calls == 1 else GOOD["triage"]  # repaired on the 2nd try

    stack.engine.reply = reply
    await stack.runner.start()
    accepted = await stack.runner.submit(incoming("a", "/triage what is wrong?", RECEIPT))
    finals = await stack.adapter.wait_for_finals(1)
    answer = finals[0].event
    assert isinstance(answer, Final) and "Billing" in answer.text and "```json" in answer.text
    job = await stack.jobs.get(accepted.job_id)
    assert job is not None and job.origin["preset"] == "triage"
    assert job.message.text == "what is wrong?"
    assert not any(isinstance(s.event, Partial) for s in stack.adapter.sent)  # no raw JSON shown

    stack.engine.reply = lambda h, m: "still not json"
    await stack.runner.submit(incoming("b", "/triage", RECEIPT))
    failed = (await stack.adapter.wait_for_finals(2))[1].event
    assert isinstance(failed, Failed) and failed.code == "preset_invalid_output"


async def test_a_memory_error_in_the_engine_is_reported_and_the_runner_goes_on(stack: Stack) -> None:
    from collections.abc import Sequence

    from bot.models import Message, Turn

    def explode(history: Sequence[Turn], message: Message) -> str:
        if message.text == "huge":
            raise MemoryError("cannot allocate")
        return "fine"

    stack.engine.reply = explode
    await stack.runner.start()
    accepted = await stack.runner.submit(incoming("a", "huge"))
    await stack.runner.submit(incoming("b", "small"))
    finals = await stack.adapter.wait_for_finals(2)
    by_chat = {f.conversation: f.event for f in finals}
    failed = by_chat["test:a"]
    assert isinstance(failed, Failed) and failed.code == "failed" and failed.ref == accepted.job_id
    fine = by_chat["test:b"]
    assert isinstance(fine, Final) and fine.text == "fine"
