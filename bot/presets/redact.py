"""Personal data in triage results: e-mail addresses, payment card numbers, phone numbers.

`redact(text)` replaces them with a marker and reports which kinds it found. Cards are numbers of
13-19 digits (spaces or dashes between groups allowed) that pass the Luhn check; only the last
four digits are kept, as card receipts do. Phone numbers are told apart from error codes, dates,
times, amounts, IP addresses and version numbers by their shape: an international "+" prefix,
parentheses, two or more separated digit groups, a Chinese mobile number, or a long digit run
right after a word such as "phone" or "tel".
"""

from __future__ import annotations

import re
from collections.abc import Callable

EMAIL_MARK = "[email]"
PHONE_MARK = "[phone]"

_EMAIL = re.compile(
    r"(?<![\w.+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*\.[A-Za-z]{2,}(?![\w-])"
)
_CARD = re.compile(r"(?<![\w.,-])\d(?:[ -]?\d){12,18}(?![\w-]|[.,]\d)")
_PHONE = re.compile(
    r"(?<![\w.+/-])"
    r"(?:\+\d{1,3}[\s.-]?)?"  # country code
    r"(?:\(\d{1,5}\)[\s.-]?)?"  # area code in parentheses
    r"\d{1,15}(?:[\s.-]\d{1,8}){0,5}"
    r"(?![\w/-]|[.,:]\d)"
)
_CN_MOBILE = re.compile(r"(?<!\d)1[3-9]\d[\s-]?\d{4}[\s-]?\d{4}(?!\d)")
_PHONE_WORD = re.compile(
    r"(?:phone|tel|telephone|mobile|cell|call|fax|whatsapp|电话|手机|联系方式)\W{0,3}$", re.I
)
_DATE = re.compile(r"^(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{2,4})$")
_IPV4 = re.compile(r"^\d{1,3}(?:\.\d{1,3}){3}$")


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def _card_mark(digits: str) -> str:
    return f"[card ••••{digits[-4:]}]"


def _is_phone(candidate: str, before: str) -> bool:
    digits = re.sub(r"\D", "", candidate)
    if not 7 <= len(digits) <= 15:
        return False
    if _DATE.match(candidate) or _IPV4.match(candidate):
        return False
    groups = re.findall(r"\d+", candidate)
    if candidate.startswith("+") or "(" in candidate:
        return True
    if _PHONE_WORD.search(before):
        return True
    if "." in candidate and not re.search(r"[\s-]", candidate):
        return False  # 1.2.3.4567 — more likely a version or a number than a phone
    if all(len(g) == 3 for g in groups[1:]):
        return False  # 10 000 000: a number with thousands separators
    return len(groups) >= 3 and all(len(g) >= 2 for g in groups[1:])


def _sub(pattern: re.Pattern[str], text: str, replace: Callable[[re.Match[str]], str | None]) -> str:
    out: list[str] = []
    last = 0
    for match in pattern.finditer(text):
        replacement = replace(match)
        if replacement is None:
            continue
        out.append(text[last : match.start()])
        out.append(replacement)
        last = match.end()
    out.append(text[last:])
    return "".join(out)


def redact(text: str) -> tuple[str, set[str]]:
    """(text with personal data replaced, the kinds found: "email", "card", "phone")."""
    found: set[str] = set()

    def email(match: re.Match[str]) -> str:
        found.add("email")
        return EMAIL_MARK

    def card(match: re.Match[str]) -> str | None:
        digits = re.sub(r"\D", "", match.group())
        if not 13 <= len(digits) <= 19 or not luhn_valid(digits) or len(set(digits)) == 1:
            return None
        found.add("card")
        return _card_mark(digits)

    def cn_mobile(match: re.Match[str]) -> str:
        found.add("phone")
        return PHONE_MARK

    def phone(match: re.Match[str]) -> str | None:
        candidate = match.group().strip()
        if not _is_phone(candidate, text[max(0, match.start() - 20) : match.start()]):
            return None
        found.add("phone")
        return PHONE_MARK

    text = _sub(_EMAIL, text, email)
    text = _sub(_CARD, text, card)
    text = _sub(_CN_MOBILE, text, cn_mobile)
    text = _sub(_PHONE, text, phone)
    return text, found
