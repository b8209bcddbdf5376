"""What an evaluation run produced: one record per case, and the aggregates per task."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from statistics import mean
from typing import Any

# The headline metric of each task, and whether lower is better.
HEADLINE = {"ocr": ("cer", True), "extract": ("field_match", False),
            "triage": ("field_match", False), "describe": ("keyword_recall", False)}
_COUNTS = ("char_edits", "chars", "word_edits", "words")


@dataclass
class CaseResult:
    case_id: str
    task: str
    image: str  # path of the image file
    preset: str  # the preset asked (ocr for a text-only engine's documents)
    mode: str  # "preset": the task's own preset; "text-only": the engine could only read text;
    #            "skipped": the engine cannot answer this task at all
    answer: str  # the validated JSON (for /ocr its lines, one per line); if it never validated,
    #              the text streamed (both attempts)
    scores: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0  # the whole answer, a repair turn included
    first_piece_s: float | None = None  # until the first piece of text arrived
    json_valid: bool | None = None  # the answer validated against the preset's schema
    repaired: bool = False  # ... after one repair turn
    error: str | None = None

    @property
    def headline(self) -> float | None:
        metric, _ = HEADLINE[self.task]
        if metric not in self.scores and self.mode == "text-only":
            metric = "fields_in_text"
        return self.scores.get(metric)


@dataclass
class RunResult:
    label: str  # the variant, e.g. "vlm+hints"
    engine: dict[str, Any]  # name, model, dtype, details
    settings: dict[str, Any]  # the settings this variant changed
    load_s: float
    cases: list[CaseResult] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per task: cases, errors, the mean of every score (cer and word_accuracy over all
        characters and words of the task), JSON validity, and times."""
        out: dict[str, dict[str, Any]] = {}
        for task in HEADLINE:
            done = [c for c in self.cases if c.task == task and c.mode != "skipped"]
            skipped = sum(1 for c in self.cases if c.task == task and c.mode == "skipped")
            if not done:
                if skipped:
                    out[task] = {"cases": 0, "skipped": skipped}
                continue
            entry: dict[str, Any] = {"cases": len(done), "errors": sum(c.error is not None
                                                                       for c in done)}
            if skipped:
                entry["skipped"] = skipped
            names = sorted({k for c in done for k in c.scores if k not in _COUNTS})
            for name in names:
                entry[name] = mean(c.scores.get(name, 0.0) for c in done)
            if all(k in c.scores for c in done for k in _COUNTS):
                chars = sum(c.scores["chars"] for c in done)
                words = sum(c.scores["words"] for c in done)
                entry["cer"] = sum(c.scores["char_edits"] for c in done) / max(1, chars)
                entry["word_accuracy"] = max(0.0, 1 - sum(c.scores["word_edits"] for c in done)
                                             / max(1, words))
            validity = [c.json_valid for c in done if c.json_valid is not None]
            if validity:
                entry["json_valid"] = mean(float(v) for v in validity)
                entry["repaired"] = mean(float(c.repaired) for c in done if c.json_valid
                                         is not None)
            entry["seconds_per_image"] = mean(c.seconds for c in done)
            firsts = [c.first_piece_s for c in done if c.first_piece_s is not None]
            if firsts:
                entry["first_piece_s"] = mean(firsts)
            out[task] = entry
        return out

    def seconds_per_image(self) -> float | None:
        done = [c.seconds for c in self.cases if c.mode != "skipped"]
        return mean(done) if done else None

    def worst(self, count: int = 8) -> list[CaseResult]:
        """The cases that scored worst on their task's headline metric (errors first)."""
        def badness(case: CaseResult) -> float:
            value = case.headline
            if value is None:
                return 2.0
            lower_better = HEADLINE[case.task][1] and case.mode != "text-only"
            return value if lower_better else 1.0 - value

        scored = [c for c in self.cases if c.mode != "skipped"]
        return sorted(scored, key=badness, reverse=True)[:count]

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "engine": self.engine, "settings": self.settings,
                "load_s": self.load_s, "seconds_per_image": self.seconds_per_image(),
                "summary": self.summary(), "cases": [asdict(c) for c in self.cases]}
