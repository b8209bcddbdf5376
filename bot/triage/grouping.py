"""Repeat-error grouping: a triage's error text and code, normalised, matched against recent ones.

What differs between two reports of one error is masked: URLs' query strings and fragments,
e-mail addresses, UUIDs, timestamps, dates and times, hex ids, ids mixing letters and digits, and
numbers. Case, punctuation and spacing go too. What names the error is kept apart and compared
exactly: its codes (the result's error_code, codes in the text such as E1001 or ORA-00942, the
number after "error", "code", "status", "HTTP", "errno" or "exit") and the endpoints it names
(a URL's host and path). Two reports that both name codes with none in common are different
errors, however alike their words; the same for endpoints.

The rest of the text is compared with rapidfuzz's Indel similarity (0-100), the mean of two:
over characters (forgiving a typo) and over words (one different word in a short message, as in
"Export failed: disk full" / "Import failed: disk full", weighs as much as it means). A
candidate scoring at least the threshold is the same error. The default, 85
(VLBOT_TRIAGE__GROUP_THRESHOLD), was chosen on the hand-made texts of
tests/test_triage_grouping.py: reports of one error that differ in ids, times, numbers,
punctuation, a typo or a synonym ("log in" / "sign in") score 86-100; different errors worded
alike score 35-84.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from rapidfuzz.distance import Indel

DEFAULT_THRESHOLD = 85.0

_URL = re.compile(r"\b(?:https?|wss?|ftp)://([^\s?#<>\"'/]+)([^\s?#<>\"']*)(?:[?#][^\s<>\"']*)?", re.I)
_EMAIL = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_UUID = re.compile(r"\b[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}\b", re.I)
_TIMESTAMP = re.compile(
    r"\b\d{4}-\d{1,2}-\d{1,2}[tT ]\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:[zZ]|[+-]\d{2}:?\d{2})?\b"
)
_MONTH = r"(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\.?"
_DATE = re.compile(
    rf"\b(?:\d{{4}}[-/.]\d{{1,2}}[-/.]\d{{1,2}}|\d{{1,2}}[-/.]\d{{1,2}}[-/.]\d{{2,4}}"
    rf"|\d{{1,2}} {_MONTH} \d{{2,4}}|{_MONTH} \d{{1,2}},? \d{{4}})\b",
    re.I,
)
_TIME = re.compile(r"\b\d{1,2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?: ?[ap]\.?m\.?(?!\w))?(?: ?(?:utc|gmt|z)\b)?",
                   re.I)
_HEX = re.compile(r"\b0x[0-9a-f]+\b|\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b", re.I)
# request / trace / order ids: a token of 6+ letters, digits, _ or - holding both
_MIXED_ID = re.compile(r"\b(?=[\w-]*\d)(?=[\w-]*[a-z])[a-z0-9][\w-]{5,}\b", re.I)
_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)*")
# codes in the text: E1001, ORA-00942, ERR_42 (capitals first), and "status code 500"
_WORD_CODE = re.compile(r"\b[A-Z][A-Z_]{0,7}[-_]?\d{2,6}\b")
_NUMBER_CODE = re.compile(
    r"\b(?:error|err|code|status|http|errno|exit)(?: code)?\s*[:#]?\s*(\d{1,6})\b", re.I
)
# an explicit error_code is a code, not an id, when it has at most one run of at most 6 digits
_CODE_SHAPED = re.compile(r"[^\d]*\d{0,6}[^\d]*")
_NOT_WORD = re.compile(r"[^\w\u27e8\u27e9]+")


def _mark(name: str) -> str:
    return f"\u27e8{name}\u27e9"  # ⟨name⟩: brackets no error text uses


def _plain(text: str) -> str:
    return unicodedata.normalize("NFKC", text).strip()


def _code_form(code: str) -> str:
    return re.sub(r"[\W_]+", "", code.casefold())


def normalise_code(code: str | None) -> str:
    """An explicit error code for comparison ("ORA-00942" = "ora 00942"); "" when it is empty or
    looks like an id (a request id, a UUID, a long number) rather than a code."""
    if not code:
        return ""
    text = _plain(code)
    if not _CODE_SHAPED.fullmatch(text) or _UUID.search(text):
        return ""
    return _code_form(text)


def normalise_text(text: str | None) -> tuple[str, frozenset[str], frozenset[str]]:
    """(masked text, codes, endpoints) of an error message (see the module's docstring)."""
    if not text:
        return "", frozenset(), frozenset()
    text = _plain(text)
    endpoints: set[str] = set()

    def url(match: re.Match[str]) -> str:
        host, path = match.group(1).casefold(), match.group(2).rstrip("/.,;:)")
        endpoints.add(host + _NUMBER.sub("#", _HEX.sub("#", _UUID.sub("#", path))))
        return _mark("url")

    text = _URL.sub(url, text)
    text = _EMAIL.sub(_mark("email"), text)
    text = _UUID.sub(_mark("uuid"), text)
    text = _TIMESTAMP.sub(_mark("time"), text)
    text = _DATE.sub(_mark("date"), text)
    text = _TIME.sub(_mark("time"), text)
    codes = {_code_form(m) for m in _WORD_CODE.findall(text)}
    text = _WORD_CODE.sub(_mark("code"), text)
    codes |= {m for m in _NUMBER_CODE.findall(text)}
    text = _NUMBER_CODE.sub(lambda m: m.group()[: m.start(1) - m.start()] + _mark("code"), text)
    text = text.casefold()
    text = _HEX.sub(_mark("id"), text)
    text = _MIXED_ID.sub(_mark("id"), text)
    text = _NUMBER.sub(_mark("n"), text)
    return _NOT_WORD.sub(" ", text).strip(), frozenset(codes), frozenset(endpoints)


@dataclass(frozen=True)
class ErrorKey:
    """What a triage is grouped by: its masked error text, its codes and the endpoints it names."""

    text: str
    codes: frozenset[str]
    endpoints: frozenset[str]

    @classmethod
    def of(cls, error_message: str | None, error_code: str | None) -> ErrorKey:
        text, codes, endpoints = normalise_text(error_message)
        code = normalise_code(error_code)
        return cls(text, codes | {code} if code else codes, endpoints)

    @property
    def empty(self) -> bool:
        return not self.text and not self.codes


def similarity(a: ErrorKey, b: ErrorKey) -> float:
    """0-100: how alike two errors are; 0 when they name codes (or endpoints) with none in
    common, or when there is nothing to compare."""
    if a.empty or b.empty:
        return 0.0
    if a.codes and b.codes and not a.codes & b.codes:
        return 0.0
    if a.endpoints and b.endpoints and not a.endpoints & b.endpoints:
        return 0.0
    if a.text and b.text:
        chars = Indel.normalized_similarity(a.text, b.text)
        words = Indel.normalized_similarity(a.text.split(), b.text.split())
        return 50.0 * (chars + words)
    if not a.text and not b.text:  # codes alone, one in common
        return 100.0
    return 0.0  # one has a message, the other only a code: not enough to say


@dataclass(frozen=True)
class Candidate:
    group_id: str
    key: ErrorKey


def best_match(
    key: ErrorKey, candidates: Sequence[Candidate], threshold: float = DEFAULT_THRESHOLD
) -> Candidate | None:
    """The most alike candidate scoring at least `threshold` (the first of equals), or None."""
    best: Candidate | None = None
    best_score = threshold
    for candidate in candidates:
        score = similarity(key, candidate.key)
        if score >= best_score and (best is None or score > best_score):
            best, best_score = candidate, score
    return best
