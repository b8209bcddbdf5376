"""The metrics: each scores one answer against one case's labels.

- /ocr: character error rate (edits / reference characters) and word accuracy (1 - word edits /
  reference words, floored at 0); Chinese, Japanese and Korean characters count as one word each.
  Edit distances come from rapidfuzz (C++ Levenshtein, also over word lists).
- /extract: normalised exact field match and ANLS as DocVQA defines it (1 - normalised Levenshtein
  distance when that distance is below 0.5, else 0; lower-cased, whitespace collapsed); each
  expected item name counts as a field, matched against the best predicted item.
- /triage: field match (error message, error code, severity, set of personal data kinds) and ANLS
  of the message and code; JSON validity is counted by the runner.
- /describe: keyword recall (groups of synonyms; a group is hit if any of its words is used).
- `fields_in_text`: for an engine that only reads text (engine=ocr): the share of the printed
  field values found in its transcription.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Iterable, Sequence
from typing import Any

from rapidfuzz.distance import Levenshtein

from bot.evaluation.dataset import Case

ANLS_THRESHOLD = 0.5
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_EDGE_PUNCTUATION = " .,;:!?\"'`()[]{}<>。，；：！？、“”‘’"


def normalise_text(text: str) -> str:
    """NFKC (full-width forms to ASCII), whitespace collapsed to single spaces, case kept."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def words(text: str) -> list[str]:
    return _WORD.findall(normalise_text(text))


def char_edits(answer: str, reference: str) -> tuple[int, int]:
    """(character edits, reference characters) after normalise_text."""
    ref = normalise_text(reference)
    return Levenshtein.distance(normalise_text(answer), ref), len(ref)


def word_edits(answer: str, reference: str) -> tuple[int, int]:
    ref = words(reference)
    return Levenshtein.distance(words(answer), ref), len(ref)


def cer(answer: str, reference: str) -> float:
    edits, length = char_edits(answer, reference)
    return edits / length if length else float(edits > 0)


def word_accuracy(answer: str, reference: str) -> float:
    edits, length = word_edits(answer, reference)
    return max(0.0, 1.0 - edits / length) if length else float(edits == 0)


def anls(answer: str, golds: str | Sequence[str], threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalized Levenshtein Similarity for one question (DocVQA): the best over the
    gold answers of 1 - NL, where NL = distance / max(length) and scores with NL >= threshold
    are 0."""
    answers = [golds] if isinstance(golds, str) else list(golds)
    predicted = " ".join(answer.strip().lower().split())
    best = 0.0
    for gold in answers:
        expected = " ".join(gold.strip().lower().split())
        longest = max(len(predicted), len(expected))
        distance = Levenshtein.distance(predicted, expected) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def normalise_value(value: Any) -> str:
    """A field value for comparison: numbers to 2 decimals; text NFKC, case-folded, whitespace
    collapsed, surrounding punctuation stripped."""
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value).lower()
    if isinstance(value, (int, float)):
        return f"{float(value):.2f}" if math.isfinite(value) else ""
    if isinstance(value, (list, tuple, set, frozenset)):
        return ",".join(sorted(normalise_value(v) for v in value))
    return normalise_text(str(value)).casefold().strip(_EDGE_PUNCTUATION)


def field_match(answer: Any, expected: Any) -> bool:
    if isinstance(expected, (int, float)) and not isinstance(expected, bool):
        try:
            return abs(float(answer) - float(expected)) < 0.005
        except (TypeError, ValueError):
            return False
    return normalise_value(answer) == normalise_value(expected) and answer is not None


def _value_text(value: Any) -> str:
    return "" if value is None else (normalise_value(value) if not isinstance(value, str) else value)


def flatten_document(document: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """An extract result as (flat fields, item names): scalar fields by name, a form's entries as
    `field:<label>`, every item of a receipt, invoice or menu section as an item name."""
    flat: dict[str, Any] = {}
    items: list[str] = []
    for key, value in document.items():
        if key == "items" and isinstance(value, list):
            items += [str(i.get("name", "")) for i in value if isinstance(i, dict)]
        elif key == "sections" and isinstance(value, list):
            for section in value:
                for item in (section or {}).get("items") or []:
                    if isinstance(item, dict):
                        items.append(str(item.get("name", "")))
        elif key == "fields" and isinstance(value, list):
            for entry in value:
                if isinstance(entry, dict) and entry.get("label"):
                    flat[f"field:{normalise_value(entry['label'])}"] = entry.get("value")
        elif not isinstance(value, (list, dict)):
            flat[key] = value
    return flat, items


def _expected_key(key: str) -> str:
    return f"field:{normalise_value(key[6:])}" if key.startswith("field:") else key


def score_fields(answer: dict[str, Any], case: Case) -> dict[str, float]:
    """field_match and anls over the case's fields (and item names), each in [0, 1]."""
    flat, items = flatten_document(answer)
    matches: list[float] = []
    similarities: list[float] = []
    for key, expected in case.fields.items():
        got = flat.get(_expected_key(key), answer.get(key))
        matches.append(float(field_match(got, expected)))
        if isinstance(expected, (list, tuple)):
            similarities.append(matches[-1])
        else:
            similarities.append(anls(_value_text(got), _value_text(expected)))
    for name in case.items:
        matches.append(float(any(field_match(item, name) for item in items)))
        similarities.append(max((anls(item, name) for item in items), default=0.0))
    if not matches:
        return {}
    return {"field_match": sum(matches) / len(matches),
            "anls": sum(similarities) / len(similarities)}


def keyword_recall(text: str, groups: Iterable[Sequence[str]]) -> float:
    wanted = [list(group) for group in groups]
    if not wanted:
        return 0.0
    said = normalise_text(text).casefold()
    hits = sum(1 for group in wanted if any(_mentions(said, w) for w in group))
    return hits / len(wanted)


def _mentions(text: str, keyword: str) -> bool:
    """A whole-word mention (Chinese, Japanese, Korean keywords: anywhere, no word breaks)."""
    keyword = normalise_text(keyword).casefold()
    if re.search(f"[{_CJK}]", keyword):
        return keyword in text
    return re.search(rf"(?<!\w){re.escape(keyword)}(?!\w)", text) is not None


def visible_fields(case: Case) -> dict[str, str]:
    """The case's field values (and item names) that are printed in the image, as printed."""
    shown = normalise_value(" ".join(case.text))
    out = {}
    for key, value in [*case.fields.items(), *((f"item:{n}", n) for n in case.items)]:
        text = normalise_value(value)
        if text and not isinstance(value, (list, tuple, bool)) and text in shown:
            out[key] = text
    return out


def fields_in_text(transcription: str, case: Case) -> dict[str, float]:
    """For a text-only engine: the share of printed field values its transcription contains."""
    fields = visible_fields(case)
    if not fields:
        return {}
    said = normalise_value(transcription)
    return {"fields_in_text": sum(text in said for text in fields.values()) / len(fields)}


def score_transcription(answer: str, case: Case) -> dict[str, float]:
    """cer and word_accuracy of a transcription, with the counts the totals are summed from."""
    reference = "\n".join(case.text)
    chars_wrong, chars = char_edits(answer, reference)
    words_wrong, word_count = word_edits(answer, reference)
    return {
        "cer": chars_wrong / chars if chars else float(chars_wrong > 0),
        "word_accuracy": max(0.0, 1.0 - words_wrong / word_count) if word_count else 0.0,
        "char_edits": chars_wrong, "chars": chars, "word_edits": words_wrong, "words": word_count,
    }


def score_answer(case: Case, document: dict[str, Any] | None, text: str) -> dict[str, float]:
    """A case's scores from the preset's validated result (None if there is none) and its text."""
    if case.task == "ocr":
        return score_transcription(text, case)
    if case.task in ("extract", "triage"):
        return score_fields(document or {}, case)
    summary = " ".join([str((document or {}).get("summary", "")),
                        *map(str, (document or {}).get("tags", []))])
    return {"keyword_recall": keyword_recall(summary, case.keywords)}
