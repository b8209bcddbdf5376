"""vlbot through its runner, in its own process: ``python -m benchmarks.vlbot_part SPEC OUT``.

The stack is the production one (SQLite database, history and job stores, the runner, BotCore,
QwenVLEngine) with a small in-process adapter that timestamps every reply event. Measured:
load-to-ready (engine.load() in a fresh process), each image's first turn (engine time to first
token and decode rate from `engine.last_stats`, bot end-to-end from submit to the Final event), a
follow-up question in the same chat, N concurrent chats, RSS over a burst of queued jobs, peak RSS.
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.helpers import (
    decode_bytes_per_token,
    decode_rate,
    growth_pct,
    interleaved,
    layer_read_rate_apart,
    overall_aggregate_rate,
    proc_status_bytes,
    steady_aggregate_rate,
    tensor_bytes,
)

_PROCESS_STARTED = time.monotonic()  # heavy modules (torch, transformers) are imported later

QUESTION = "Describe this image in detail."
FOLLOW_UP = "What is written in the first line of text?"


@dataclass
class Trace:
    session: str | None
    started: float
    piece_times: list[float] = field(default_factory=list)
    text: str = ""
    stats: Any = None


class TimedEngine:
    """Passes everything to the real engine; records each stream's piece times and last_stats."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.traces: dict[str | None, list[Trace]] = defaultdict(list)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    @property
    def info(self) -> Any:
        return self.inner.info

    @property
    def ready(self) -> bool:
        return bool(self.inner.ready)

    async def load(self) -> None:
        await self.inner.load()

    def check(self, message: Any) -> None:
        self.inner.check(message)

    async def close(self) -> None:
        await self.inner.close()

    async def stream(self, history: Sequence[Any], message: Any, params: Any) -> AsyncGenerator[str, None]:
        trace = Trace(params.session, time.monotonic())
        self.traces[params.session].append(trace)
        inner = self.inner.stream(history, message, params)
        try:
            async for piece in inner:
                trace.piece_times.append(time.monotonic())
                trace.text += piece
                yield piece
        finally:
            await inner.aclose()
            trace.stats = self.inner.last_stats


class BenchAdapter:
    """Records reply events with their arrival time, per job."""

    platform = "bench"

    def __init__(self) -> None:
        self.events: dict[str, list[tuple[float, Any]]] = defaultdict(list)
        self.core: Any = None

    async def start(self, core: Any) -> None:
        self.core = core

    async def stop(self) -> None:
        pass

    async def send(self, job: Any, event: Any) -> dict[str, Any] | None:
        self.events[job.id].append((time.monotonic(), event))
        return None

    async def wait_done(self, job_id: str, timeout_s: float = 3600.0) -> None:
        from bot.adapter import Failed, Final

        deadline = time.monotonic() + timeout_s
        while not any(isinstance(e, (Final, Failed)) for _, e in self.events[job_id]):
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} not answered in {timeout_s:.0f} s")
            await asyncio.sleep(0.005)

    def timeline(self, job_id: str, submitted: float) -> dict[str, Any]:
        from bot.adapter import Failed, Final, Partial

        out: dict[str, Any] = {"first_token_s": None, "final_s": None}
        for at, event in self.events[job_id]:
            if isinstance(event, Partial) and out["first_token_s"] is None:
                out["first_token_s"] = at - submitted
            elif isinstance(event, Final):
                out["final_s"] = at - submitted
            elif isinstance(event, Failed):
                out["error"] = f"failed: {event.code}"
        return out


async def read_bytes(path: str) -> bytes:
    return await asyncio.to_thread(Path(path).read_bytes)


def screened_head_bytes(scheduler: Any) -> int | None:
    """Bytes of the output head's 8-bit copy where decode steps read it instead of the head
    (engine.cpu.kernels.output_head), else None."""
    head = getattr(scheduler, "head", None)
    copy = getattr(head, "copy", None)
    if copy is None or not getattr(head, "screens", False):
        return None
    return tensor_bytes(copy.parts())


def rss_bytes() -> int:
    return proc_status_bytes("VmRSS") or 0


def peak_rss_bytes() -> int | None:
    return proc_status_bytes("VmHWM")


def force_tokens(engine: Any, n: int) -> None:
    """Ask for exactly `n` new tokens where the engine uses generate() (min_new_tokens)."""
    model = getattr(engine, "model", None)
    config = getattr(model, "generation_config", None)
    if config is not None:
        config.min_new_tokens = n


class Bench:
    def __init__(self, spec: dict[str, Any], out: Path) -> None:
        self.spec = spec
        self.out = out
        self.result: dict[str, Any] = {"runs": []}

    def save(self) -> None:
        self.result["peak_rss_bytes"] = peak_rss_bytes()
        self.out.write_text(json.dumps(self.result, indent=2, default=str), encoding="utf-8")

    async def ask(self, chat: str, text: str, image: bytes | None = None) -> tuple[str, float]:
        from bot.adapter import Incoming
        from bot.models import ConversationId, ImagePart, Message, User

        images = [ImagePart(image, "image/jpeg", "bench.jpg")] if image is not None else []
        incoming = Incoming(
            conversation=ConversationId("bench", chat),
            user=User(f"u-{chat}", "Bench"),
            message=Message.of(text, *images),
            origin={"chat": chat},
        )
        submitted = time.monotonic()
        acceptance = await self.core.submit(incoming)
        return acceptance.job_id, submitted

    async def turn(self, chat: str, text: str, image: bytes | None, tokens: int) -> dict[str, Any]:
        """One question through the runner, answered before it returns; engine and bot figures."""
        self.runner.params = replace(self.runner.params, max_new_tokens=tokens)
        force_tokens(self.engine.inner, tokens)
        job_id, submitted = await self.ask(chat, text, image)
        await self.adapter.wait_done(job_id)
        line = self.adapter.timeline(job_id, submitted)
        trace = self.engine.traces[f"bench:{chat}"][-1]
        stats = trace.stats
        out: dict[str, Any] = {
            "e2e_s": line["final_s"],
            "bot_ttft_s": line["first_token_s"],
            "piece_times": trace.piece_times,
            "tokens_from_text": self.count_tokens(trace.text),
            # prompt tokens served from the conversation's KV cache (engines that report it)
            "reused_tokens": getattr(self.engine.inner, "last_reused_tokens", None),
        }
        if "error" in line:
            out["error"] = line["error"]
        if stats is not None:
            out.update(
                prompt_tokens=stats.prompt_tokens,
                visual_tokens=stats.visual_tokens,
                tokens=stats.completion_tokens,
                ttft_s=stats.time_to_first_token_s,
                engine_total_s=stats.total_s,
                decode_tok_s=decode_rate(
                    stats.completion_tokens, stats.total_s - stats.time_to_first_token_s
                ),
            )
        return out

    def count_tokens(self, text: str) -> int:
        tokenizer = self.engine.inner.processor.tokenizer
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    async def run(self) -> None:
        from bot.core import BotCore
        from bot.db import Database
        from bot.history import HistoryStore
        from bot.jobs import JobStore
        from bot.models import GenerationParams
        from bot.runner import Runner
        from engine import QwenVLEngine

        spec = self.spec
        inner = QwenVLEngine(spec["model"], **spec.get("engine_options", {}))
        loading = time.monotonic()
        await inner.load()
        ready = time.monotonic()
        self.result.update(
            load_s=ready - loading,
            process_ready_s=ready - float(spec.get("spawned_at", _PROCESS_STARTED)),
            engine_info={"dtype": inner.info.dtype, "threads": inner.info.threads, **inner.info.details},
            weights_bytes=tensor_bytes([*inner.model.parameters(), *inner.model.buffers()]),
            rss_after_load_bytes=rss_bytes(),
        )
        self.save()
        print(f"vlbot loaded in {ready - loading:.2f} s", flush=True)
        # The engine uses its first idle seconds to move the weights onto huge pages (it stops
        # for any request and resumes later); a bot that just started has that time before its
        # first question. Measure from the point it is done, and record how long it took.
        scheduler = getattr(inner, "scheduler", None)
        while scheduler is not None and not scheduler.prepared:
            if time.monotonic() - ready > 120:
                break
            await asyncio.sleep(0.05)
        self.result["settled_s"] = time.monotonic() - ready
        self.result["bytes_per_token"] = decode_bytes_per_token(inner.model, screened_head_bytes(scheduler))
        print(f"vlbot settled {self.result['settled_s']:.2f} s after ready", flush=True)
        self.engine = TimedEngine(inner)
        with tempfile.TemporaryDirectory(prefix="vlbot-bench-") as tmp:
            db = await Database.open(Path(tmp) / "bench.sqlite3")
            history = HistoryStore(db, turns_in_prompt=10)
            jobs = JobStore(db, history)
            self.runner = Runner(
                jobs,
                history,
                self.engine,
                max_concurrency=max(1, int(spec.get("concurrent", 0))),
                max_queue=10_000,
                job_timeout_s=7200.0,
                params=GenerationParams(max_new_tokens=int(spec["new_tokens"]), temperature=0.0),
            )
            self.adapter = BenchAdapter()
            self.runner.attach({"bench": self.adapter})
            self.core = BotCore(self.runner, history, self.engine)
            await self.runner.start()
            await self.adapter.start(self.core)
            try:
                await self.measure()
            finally:
                await self.runner.stop(grace_s=1)
                await db.close()
                await inner.close()
        self.save()

    async def measure(self) -> None:
        spec = self.spec
        n = int(spec["new_tokens"])
        await self.turn("warmup", "Hello", None, 2)
        for label, path in spec["images"].items():
            entry: dict[str, Any] = {"image": label}
            try:
                # the memory speed of the moment, right before and right after, for this decode's
                # share of it (a shared VM's bandwidth swings within minutes)
                before = layer_read_rate_apart(self.engine.inner.model)["bytes_per_s"] / 1e9
                entry.update(await self.turn(f"img-{label}", QUESTION, await read_bytes(path), n))
                entry["read_gb_s"] = layer_read_rate_apart(self.engine.inner.model)["bytes_per_s"] / 1e9
                entry["read_before_gb_s"] = before
                if spec.get("followup", True):
                    entry["followup"] = await self.turn(
                        f"img-{label}", FOLLOW_UP, None, int(spec.get("followup_tokens", n))
                    )
            except Exception as e:
                entry["error"] = f"{type(e).__name__}: {e}"
            self.result["runs"].append(entry)
            self.save()
            print(
                f"vlbot {label}: "
                + json.dumps({k: v for k, v in entry.items() if k != "piece_times"}, default=str)[:600],
                flush=True,
            )
        if int(spec.get("concurrent", 0)) > 1:
            self.result["concurrent"] = await self.concurrent()
            self.save()
            print(
                "vlbot concurrent: "
                + json.dumps({k: v for k, v in self.result["concurrent"].items() if k != "chats"}),
                flush=True,
            )
        if int(spec.get("queue_jobs", 0)) > 0:
            self.result["queue"] = await self.queue_burst(int(spec["queue_jobs"]))
            self.save()
            print(
                "vlbot queue: "
                + json.dumps({k: v for k, v in self.result["queue"].items() if k != "rss_samples"}),
                flush=True,
            )

    async def concurrent(self) -> dict[str, Any]:
        spec = self.spec
        n = int(spec["new_tokens"])
        label = spec["concurrent_image"]
        paths: list[str] = spec["concurrent_images"]
        self.runner.params = replace(self.runner.params, max_new_tokens=n)
        force_tokens(self.engine.inner, n)
        data = [await read_bytes(p) for p in paths]
        t0 = time.monotonic()
        asked = await asyncio.gather(*(self.ask(f"conc-{i}", QUESTION, d) for i, d in enumerate(data)))
        for job_id, _ in asked:
            await self.adapter.wait_done(job_id)
        single = next(
            (r for r in self.result["runs"] if r.get("image") == label and r.get("piece_times")), None
        )
        # Tokens per streamed piece, from the single run (exact there: its last_stats is its own;
        # concurrent streams finishing at the same step would overwrite each other's last_stats).
        per_piece = 1.0
        if single is not None and single.get("tokens") and single["piece_times"]:
            per_piece = single["tokens"] / len(single["piece_times"])
        chats = []
        for i, (job_id, submitted) in enumerate(asked):
            line = self.adapter.timeline(job_id, t0)
            trace = self.engine.traces[f"bench:conc-{i}"][-1]
            chats.append(
                {
                    **line,
                    "submit_offset_s": submitted - t0,
                    "tokens": min(n, round(per_piece * len(trace.piece_times))),
                    "tokens_from_text": self.count_tokens(trace.text),
                    "pieces": len(trace.piece_times),
                    "piece_times": [t - t0 for t in trace.piece_times],
                }
            )
        single_rate = None
        if single is not None:
            tokens = single.get("tokens") or round(per_piece * len(single["piece_times"]))
            single_rate = steady_aggregate_rate([{"piece_times": single["piece_times"], "tokens": tokens}])
        return {
            "n_chats": len(paths),
            "image": label,
            "chats": chats,
            "steady_tok_s": steady_aggregate_rate(chats),
            "overall_tok_s": overall_aggregate_rate(chats),
            "single_tok_s": single_rate,
            "interleaved": interleaved(chats),
            "wall_s": max((c["final_s"] or 0.0) for c in chats),
        }

    async def queue_burst(self, jobs: int) -> dict[str, Any]:
        """`jobs` short text questions in as many chats, all queued at once; RSS sampled."""
        self.runner.params = replace(self.runner.params, max_new_tokens=4)
        force_tokens(self.engine.inner, 4)
        samples: list[float] = []
        stop = asyncio.Event()

        async def sample() -> None:
            while not stop.is_set():
                samples.append(float(rss_bytes()))
                await asyncio.sleep(0.25)

        sampler = asyncio.create_task(sample())
        started = time.monotonic()
        asked = [
            await self.ask(f"queue-{i}", f"Question number {i}: what is {i} plus {i}?") for i in range(jobs)
        ]
        queued_peak = self.runner.queue_depth
        checkpoints: list[float] = []
        for k, (job_id, _) in enumerate(asked):
            await self.adapter.wait_done(job_id)
            if (k + 1) % max(1, jobs // 10) == 0:
                checkpoints.append(float(rss_bytes()))
        stop.set()
        await sampler
        return {
            "jobs": jobs,
            "queue_depth_after_submit": queued_peak,
            "wall_s": time.monotonic() - started,
            "rss_checkpoints": checkpoints,
            "rss_growth_pct": growth_pct(checkpoints),
            "peak_rss_bytes": max(samples) if samples else None,
            "rss_samples": samples[:: max(1, len(samples) // 100)],
        }


def main(spec_path: str, out_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    bench = Bench(spec, Path(out_path))
    asyncio.run(bench.run())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1], sys.argv[2]))
