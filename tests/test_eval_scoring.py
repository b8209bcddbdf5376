"""The evaluation's metrics on hand-made answer/label pairs: perfect, empty, partial, wrong order."""

from __future__ import annotations

from typing import Any

import pytest

from bot.evaluation.dataset import Case
from bot.evaluation.results import CaseResult, RunResult
from bot.evaluation.scoring import (
    anls,
    cer,
    field_match,
    fields_in_text,
    keyword_recall,
    score_answer,
    score_fields,
    word_accuracy,
    words,
)


def case(task: str, text: tuple[str, ...] = (), fields: dict[str, Any] | None = None,
         items: tuple[str, ...] = (), keywords: tuple[tuple[str, ...], ...] = ()) -> Case:
    return Case("c", task, "c.png", "0" * 64, "image/png", text, fields or {}, items, keywords)


# --- character error rate and word accuracy --------------------------------------------------


def test_cer_perfect_empty_partial() -> None:
    assert cer("Payment failed", "Payment failed") == 0.0
    assert cer("", "Payment failed") == 1.0  # every character deleted
    assert cer("Paymnt faild", "Payment failed") == pytest.approx(2 / 14)  # two deletions
    assert cer("Payment  failed\n", "Payment failed") == 0.0  # whitespace layout is not an error


def test_cer_counts_insertions_and_can_exceed_one() -> None:
    assert cer("Payment failed!!", "Payment failed") == pytest.approx(2 / 14)
    assert cer("x" * 30, "abc") > 1.0


def test_word_accuracy_perfect_empty_partial_wrong_order() -> None:
    reference = "the card was declined"
    assert word_accuracy(reference, reference) == 1.0
    assert word_accuracy("", reference) == 0.0
    assert word_accuracy("the card was", reference) == pytest.approx(0.75)
    # wrong order: two substitutions out of four words (the characters are all there)
    assert word_accuracy("the was card declined", reference) == pytest.approx(0.5)
    assert word_accuracy("a b c d e f g h", reference) == 0.0  # floored, never negative


def test_chinese_characters_are_words() -> None:
    assert words("保存失败 OK") == ["保", "存", "失", "败", "OK"]
    assert word_accuracy("保存成功", "保存失败") == pytest.approx(0.5)
    assert cer("保存成功", "保存失败") == pytest.approx(0.5)


# --- ANLS (DocVQA) --------------------------------------------------------------------------------


def test_anls_perfect_empty_partial_and_threshold() -> None:
    assert anls("Your card was declined.", "Your card was declined.") == 1.0
    assert anls("  YOUR card  was declined. ", "your card was declined.") == 1.0  # case, spaces
    assert anls("", "declined") == 0.0
    assert anls("declinde", "declined") == pytest.approx(1 - 2 / 8)  # a transposition: 2 edits
    assert anls("abcdef", "abcxyz") == 0.0  # distance 0.5 is not below the threshold
    assert anls("abcdex", "abcdef") == pytest.approx(1 - 1 / 6)


def test_anls_takes_the_best_gold_answer() -> None:
    assert anls("USD", ["US dollar", "USD"]) == 1.0
    assert anls("USD", ["USD", "US dollar"]) == 1.0


# --- field match -----------------------------------------------------------------------------------


def test_field_match_normalises_text_and_numbers() -> None:
    assert field_match("  cafe aurora. ", "CAFE AURORA")
    assert field_match(13.53, 13.53) and field_match("13.53", 13.53)
    assert not field_match(13.5, 13.53)
    assert not field_match(None, "EUR")
    assert field_match(["phone", "email"], ["email", "phone"])  # a set: order does not matter
    assert not field_match([], ["email"])


RECEIPT = case("extract", fields={"document_type": "receipt", "merchant": "CAFE AURORA",
                                  "total": 13.53, "currency": "EUR"},
               items=("Espresso", "Croissant"))


def test_extract_perfect_answer_scores_one_in_any_item_order() -> None:
    answer = {"document_type": "receipt", "merchant": "Cafe Aurora", "total": 13.53,
              "currency": "EUR", "items": [{"name": "Croissant"}, {"name": "Espresso"}]}
    assert score_fields(answer, RECEIPT) == {"field_match": 1.0, "anls": 1.0}


def test_extract_empty_answer_scores_zero() -> None:
    assert score_fields({}, RECEIPT) == {"field_match": 0.0, "anls": 0.0}
    assert score_answer(RECEIPT, None, "") == {"field_match": 0.0, "anls": 0.0}


def test_extract_partial_answer() -> None:
    # merchant misspelt by one letter (ANLS partial credit, no exact match), total wrong,
    # currency right, one of two items found
    answer = {"document_type": "receipt", "merchant": "CAFE AURORE", "total": 31.53,
              "currency": "EUR", "items": [{"name": "Espresso"}]}
    scores = score_fields(answer, RECEIPT)
    assert scores["field_match"] == pytest.approx(3 / 6)
    merchant_anls = 1 - 1 / 11
    total_anls = 1 - 2 / 5  # "31.53" against "13.53"
    assert scores["anls"] == pytest.approx((1 + merchant_anls + total_anls + 1 + 1 + 0) / 6)


def test_form_fields_match_by_label() -> None:
    form = case("extract", fields={"document_type": "form", "field:Full name": "Anna Berg",
                                   "field:City": "Oslo"})
    answer = {"document_type": "form", "fields": [{"label": "City", "value": "Oslo"},
                                                  {"label": "full name:", "value": "Anna Berg"}]}
    assert score_fields(answer, form)["field_match"] == 1.0
    answer["fields"] = [{"label": "Full name", "value": "Oslo"}, {"label": "City", "value": None}]
    assert score_fields(answer, form)["field_match"] == pytest.approx(1 / 3)


def test_triage_fields() -> None:
    triage = case("triage", fields={"error_code": "E413", "severity": "major",
                                    "personal_data": ["email"]})
    perfect = {"error_code": "E413", "severity": "major", "personal_data": ["email"]}
    assert score_fields(perfect, triage)["field_match"] == 1.0
    wrong = {"error_code": "E414", "severity": "minor", "personal_data": []}
    assert score_fields(wrong, triage)["field_match"] == 0.0


# --- keyword recall, fields in text -----------------------------------------------------------------


def test_keyword_recall() -> None:
    groups = (("apple", "fruit"), ("red",), ("table", "wooden"))
    assert keyword_recall("A red apple on a wooden table", groups) == 1.0
    assert keyword_recall("", groups) == 0.0
    assert keyword_recall("Fruit, sitting somewhere", groups) == pytest.approx(1 / 3)
    assert keyword_recall("a reddish pineapple", groups) == 0.0  # whole words only


def test_fields_in_text_counts_printed_values() -> None:
    receipt = case("extract", text=("CAFE AURORA", "1 x Espresso 2.50", "TOTAL EUR €13.53"),
                   fields={"document_type": "receipt", "merchant": "CAFE AURORA", "total": 13.53},
                   items=("Espresso",))
    # document_type is not printed, so three values count
    assert fields_in_text("CAFE AURORA\n1 x Espresso 2.50\nTOTAL EUR €13.53", receipt) == {
        "fields_in_text": 1.0}
    assert fields_in_text("CAFE AUR0RA 1 x Espresso TOTAL 13.58", receipt) == {
        "fields_in_text": pytest.approx(1 / 3)}


# --- aggregates -----------------------------------------------------------------------------------


def test_summary_totals_characters_across_cases() -> None:
    long = case("ocr", text=("a" * 90,))
    short = case("ocr", text=("b" * 10,))
    run = RunResult("x", {}, {}, 0.0)
    for item, answer in ((long, "a" * 90), (short, "")):
        run.cases.append(CaseResult(item.id, "ocr", "", "ocr", "preset", answer,
                                    score_answer(item, None, answer), seconds=1.0))
    summary = run.summary()["ocr"]
    assert summary["cer"] == pytest.approx(10 / 100)  # 10 edits over 100 characters, not (0+1)/2
    assert summary["cases"] == 2
    assert run.worst(1)[0].scores["cer"] == 1.0


def test_keyword_recall_in_chinese() -> None:
    assert keyword_recall("桌子上有一个红苹果", (("苹果", "apple"), ("月亮",))) == pytest.approx(0.5)
