"""The generated evaluation set: deterministic bytes, consistent labels, clear font errors."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from bot.evaluation import fonts
from bot.evaluation.dataset import TASKS, ensure_set, generate
from bot.evaluation.fonts import FontMissing, check_fonts


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    generate(tmp_path / "a", seed=7)
    generate(tmp_path / "b", seed=7)
    generate(tmp_path / "c", seed=8)
    first, again, other = (file_hashes(tmp_path / n) for n in "abc")
    assert first == again  # every image and the manifest, byte for byte
    assert len(first) > 20
    changed = [name for name in first if first[name] != other.get(name)]
    assert "manifest.json" in changed and len(changed) > 10


def test_manifest_lists_every_file_with_its_hash_and_labels(tmp_path: Path) -> None:
    eval_set = generate(tmp_path, seed=0)
    manifest = json.loads((tmp_path / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["seed"] == 0 and len(manifest["cases"]) == len(eval_set.cases)
    assert {case.task for case in eval_set.cases} == set(TASKS)
    for case in eval_set.cases:
        assert hashlib.sha256(eval_set.path(case).read_bytes()).hexdigest() == case.sha256
        if case.task in ("ocr", "extract", "triage"):
            assert case.text, case.id
        if case.task == "describe":
            assert case.keywords, case.id
    tags = {tag for case in eval_set.cases for tag in case.tags}
    assert {"dark", "zh", "jpeg", "exif-rotated", "small-font", "large-font", "code",
            "table"} <= tags
    chinese = [c for c in eval_set.cases if "zh" in c.tags]
    assert any("保存失败" in line for c in chinese for line in c.text)


def test_document_labels_agree_with_what_is_printed(tmp_path: Path) -> None:
    eval_set = generate(tmp_path, seed=3)
    for case in eval_set.select("extract"):
        printed = "\n".join(case.text)
        if "total" in case.fields:
            assert f"{case.fields['total']:,.2f}" in printed, case.id
            assert case.fields["total"] == pytest.approx(case.fields["subtotal"] + case.fields["tax"])
        for item in case.items:
            assert item in printed, case.id


def test_exif_case_is_stored_turned_and_shown_upright(tmp_path: Path) -> None:
    eval_set = generate(tmp_path, seed=0)
    rotated = next(c for c in eval_set.cases if "exif-rotated" in c.tags)
    upright = next(c for c in eval_set.cases if c.id == "ocr-dialog-light-16px")
    with Image.open(eval_set.path(rotated)) as stored, Image.open(eval_set.path(upright)) as plain:
        assert stored.getexif()[0x0112] == 6
        assert stored.height > stored.width  # stored on its side ...
        assert ImageOps.exif_transpose(stored).width > stored.width  # ... shown landscape
        assert plain.width > plain.height


def test_ensure_set_reuses_an_intact_folder_and_regenerates_a_damaged_one(tmp_path: Path) -> None:
    eval_set = ensure_set(tmp_path, seed=1)
    image = eval_set.path(eval_set.cases[0])
    original = image.read_bytes()
    stamp = (tmp_path / "manifest.json").stat().st_mtime_ns
    assert ensure_set(tmp_path, seed=1).cases == eval_set.cases
    assert (tmp_path / "manifest.json").stat().st_mtime_ns == stamp  # reused, not rewritten
    image.write_bytes(b"damaged")
    ensure_set(tmp_path, seed=1)
    assert image.read_bytes() == original


def test_select_limits_each_task(tmp_path: Path) -> None:
    eval_set = generate(tmp_path, seed=0)
    assert [c.task for c in eval_set.select(limit=1)] == list(TASKS)
    assert {c.task for c in eval_set.select("triage")} == {"triage"}


def test_a_missing_font_names_its_debian_package(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FontMissing, match=r"fonts-dejavu-core.*apt-get install fonts-dejavu-core"):
        check_fonts(tmp_path)
    (tmp_path / "dejavu").mkdir()
    (tmp_path / "liberation").mkdir()
    for entry in fonts.FONTS.values():
        if entry.package != "fonts-wqy-microhei":
            (tmp_path / entry.path).write_bytes((fonts.FONT_ROOT / entry.path).read_bytes())
    with pytest.raises(FontMissing, match="fonts-wqy-microhei"):
        check_fonts(tmp_path)
    monkeypatch.setattr(fonts, "FONT_ROOT", tmp_path)
    with pytest.raises(FontMissing, match="fonts-wqy-microhei"):
        generate(tmp_path / "set", seed=0)
    assert not (tmp_path / "set").exists()  # nothing half-written
