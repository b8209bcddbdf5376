"""Asking an engine the set's questions the way users ask them, and scoring the answers.

Each case's image goes to `bot.presets.generate_preset` with the case's preset (/ocr, /extract,
/triage, /describe): the same prompt, validation and one repair turn a chat user gets. An engine
that can only read text (engine=ocr) is asked /ocr for the documents and error screens instead,
scored by the field values its transcription contains; the photos are skipped for it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from tqdm import tqdm

from bot.engine_port import Engine, EngineError
from bot.evaluation.dataset import Case, EvalSet
from bot.evaluation.results import CaseResult, RunResult
from bot.evaluation.scoring import fields_in_text, score_answer, score_transcription
from bot.models import GenerationParams, ImagePart, InputRejected, Message
from bot.presets import PresetFailed, PresetResult, generate_preset, get_preset
from bot.presets.schemas import OcrResultModel

__all__ = ["Engine", "EngineError", "ask_case", "evaluate"]

TEXT_ONLY_CODE = "preset_needs_vlm"
MAX_INVALID_CHARS = 4000  # of an invalid answer kept in the report


class _Clock:
    def __init__(self) -> None:
        self.started = time.monotonic()
        self.first: float | None = None
        self.pieces: list[str] = []  # everything streamed, a repair turn's answer included

    async def on_piece(self, piece: str) -> None:
        if self.first is None and piece:
            self.first = time.monotonic() - self.started
        self.pieces.append(piece)

    def seconds(self) -> float:
        return time.monotonic() - self.started


def _text_of(result: PresetResult) -> str:
    document = result.document
    return document.text if isinstance(document, OcrResultModel) else result.json()


async def _ask(engine: Engine, message: Message, params: GenerationParams, preset_name: str,
               clock: _Clock) -> PresetResult:
    preset = get_preset(preset_name)
    assert preset is not None, preset_name
    return await generate_preset(engine, [], message, params, preset, on_piece=clock.on_piece)


async def ask_case(engine: Engine, eval_set: EvalSet, case: Case,
                   params: GenerationParams) -> CaseResult:
    """One case: ask, time, score. Failures are recorded on the result, never raised (except
    EngineNotReady-style errors from a dead engine, which the caller sees as EngineError)."""
    path = eval_set.path(case)
    message = Message.of(None, ImagePart(path.read_bytes(), case.mime, case.image))
    record = CaseResult(case.id, case.task, str(path), case.task, "preset", "")
    clock = _Clock()
    try:
        engine.check(message)
        try:
            result = await _ask(engine, message, params, case.task, clock)
        except PresetFailed as exc:
            if exc.code != TEXT_ONLY_CODE:
                raise
            if case.task == "describe":
                record.mode, record.error = "skipped", "this engine cannot describe photos"
                return record
            record.mode, record.preset = "text-only", "ocr"
            clock = _Clock()
            result = await _ask(engine, message, params, "ocr", clock)
            record.answer = _text_of(result)
            record.scores = {**fields_in_text(record.answer, case),
                             **score_transcription(record.answer, case)}
        else:
            record.answer = _text_of(result) if case.task == "ocr" else result.json(indent=None)
            record.json_valid, record.repaired = True, result.repaired
            record.scores = score_answer(case, result.as_dict(), _text_of(result))
    except PresetFailed as exc:  # no valid JSON even after the repair turn
        record.json_valid, record.error = False, exc.code
        record.answer = "".join(clock.pieces)[:MAX_INVALID_CHARS]
        record.scores = score_answer(case, None, "")
    except InputRejected as exc:  # e.g. ocr_no_text: no text found
        record.error = exc.code
        record.scores = score_answer(case, None, "")
        if record.mode == "text-only":
            record.scores = {**fields_in_text("", case), **score_transcription("", case)}
    except EngineError as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        record.scores = score_answer(case, None, "")
    record.seconds = clock.seconds()
    record.first_piece_s = clock.first
    return record


async def evaluate(engine: Engine, eval_set: EvalSet, cases: list[Case], params: GenerationParams,
                   *, label: str, settings: dict[str, object] | None = None,
                   progress: bool = True,
                   on_case: Callable[[CaseResult], None] | None = None) -> RunResult:
    """Load `engine`, answer every case in turn (a progress bar on stderr), return the run."""
    started = time.monotonic()
    await engine.load()
    info = engine.info
    run = RunResult(label, {"name": info.name, "model": info.model, "dtype": info.dtype,
                            "details": dict(info.details)}, dict(settings or {}),
                    load_s=time.monotonic() - started)
    with tqdm(total=len(cases), desc=label, unit="image", file=sys.stderr, disable=not progress,
              dynamic_ncols=True) as bar:
        for case in cases:
            result = await ask_case(engine, eval_set, case, params)
            run.cases.append(result)
            if on_case is not None:
                on_case(result)
            bar.set_postfix_str(f"{case.id} {result.seconds:.1f}s", refresh=False)
            bar.update(1)
    return run
