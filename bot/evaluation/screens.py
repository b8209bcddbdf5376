"""Screenshot cases: text to transcribe (/ocr) and error screens to triage (/triage).

Dialogs, a settings list in small print, a large banner, code, a terminal, a table, Chinese and
mixed Chinese/English, German/French/Spanish, dark mode, a JPEG with noise, and a screenshot stored
turned with an EXIF orientation tag. The seed picks the names, numbers and ids shown.
"""

from __future__ import annotations

import random

from bot.evaluation.canvas import DARK, LIGHT, Drawn, Page, add_noise

NAMES = ("Anna Berg", "Liam Chen", "Sofia Rossi", "Noah Patel", "Mia Novak", "Lucas Silva")
CITIES = ("Lisbon", "Oslo", "Toronto", "Osaka", "Munich", "Dublin")


def _dialog(rng: random.Random, theme: dict[str, str], face: str, size: int) -> Page:
    page = Page(round(size * 36), theme["background"])
    page.draw.rounded_rectangle((8, 8, page.width - 8, 2000), radius=12, fill=theme["panel"])
    invoice = rng.randint(1000, 9999)
    request = "".join(rng.choice("abcdefghjkmnpqrstuvwxyz23456789") for _ in range(8))
    page.text("Could not save invoice", face, round(size * 1.4), theme["accent"])
    page.text(f"Invoice INV-{invoice} was changed by another user.", face, size, theme["text"])
    page.text(f"Request ID: req_{request}", face, size, theme["muted"])
    page.text("Reload the page to see the latest version.", face, size, theme["text"])
    page.skip(size // 2)
    x = page.button("Cancel", page.margin, face, size, theme["button"], theme["button_text"])
    page.button("Reload", x, face, size, theme["button"], theme["button_text"])
    page.record("Cancel Reload", size * 3)
    return page


def dialog(rng: random.Random, *, dark: bool, face: str, size: int) -> Drawn:
    page = _dialog(rng, DARK if dark else LIGHT, face, size)
    tag = "dark" if dark else "light"
    return Drawn(f"ocr-dialog-{tag}-{size}px", "ocr", page.finish(), page.lines, tags=[tag])


def settings_small(rng: random.Random) -> Drawn:
    page = Page(560, "#ffffff", margin=16)
    page.text("Notifications", "sans-bold", 13, "#111111")
    rows = ("Email me when a report is ready", "Send a weekly summary on Monday",
            "Play a sound for new messages", "Show previews on the lock screen",
            f"Quiet hours from 22:00 to {rng.randint(6, 8):02d}:30")
    for number, row in enumerate(rows, 1):
        page.text(f"{number}. {row}", "sans", 11, "#333333", right=rng.choice(("On", "Off")))
    return Drawn("ocr-settings-11px", "ocr", page.finish(), page.lines, tags=["small-font"])


def banner_large(rng: random.Random) -> Drawn:
    page = Page(1100, "#0f766e", margin=40)
    city = rng.choice(CITIES)
    page.text(f"Welcome to {city}", "liberation-sans-bold", 64, "#ffffff")
    page.text(f"Gate {rng.choice('ABCD')}{rng.randint(1, 40)} boards at 14:{rng.randint(10, 55)}",
              "liberation-sans", 40, "#ecfeff")
    return Drawn("ocr-banner-64px", "ocr", page.finish(), page.lines, tags=["large-font"])


def code(rng: random.Random) -> Drawn:
    page = Page(760, "#fafafa", margin=20)
    limit = rng.randint(3, 9)
    for line in (
        "def retry(call, attempts=3):",
        f"    for attempt in range({limit}):",
        "        try:",
        "            return call()",
        "        except TimeoutError as exc:",
        '            log.warning("retry %d: %s", attempt, exc)',
        '    raise RuntimeError("gave up")',
    ):
        page.text(line, "mono", 15, "#1f2937", gap=0.45)
    return Drawn("ocr-code", "ocr", page.finish(), page.lines, tags=["code"])


def terminal(rng: random.Random) -> Drawn:
    page = Page(820, "#111111", margin=18)
    port = rng.randint(3000, 9000)
    for line, colour in (
        (f"$ npm run dev -- --port {port}", "#d4d4d4"),
        ("> web@2.4.1 dev", "#a3a3a3"),
        (f"Error: listen EADDRINUSE: address already in use :::{port}", "#f87171"),
        ("    at Server.setupListenHandle (node:net:1817:16)", "#a3a3a3"),
        ("$", "#d4d4d4"),
    ):
        page.text(line, "liberation-mono", 15, colour, gap=0.5)
    return Drawn("ocr-terminal-dark", "ocr", page.finish(), page.lines, tags=["dark", "code"])


def table(rng: random.Random) -> Drawn:
    page = Page(720, "#ffffff", margin=24)
    columns = [24, 250, 420, 560]
    page.row(["Customer", "City", "Orders", "Status"], columns, "liberation-sans-bold", 16,
             "#111111")
    page.rule("#cccccc")
    for name in rng.sample(NAMES, 4):
        page.row([name, rng.choice(CITIES), str(rng.randint(1, 60)), rng.choice(("Active", "Paused"))],
                 columns, "liberation-sans", 16, "#222222")
    return Drawn("ocr-table", "ocr", page.finish(), page.lines, tags=["table"])


def chinese_dialog(rng: random.Random) -> Drawn:
    page = Page(620, "#ffffff", margin=28)
    code_number = rng.randint(1000, 9999)
    page.text("保存失败", "cjk", 28, "#b91c1c")
    page.text("网络连接超时，请检查网络后重试。", "cjk", 20, "#111111")
    page.text(f"错误代码：E{code_number}", "cjk", 20, "#4b5563")
    page.text("如果问题仍然存在，请联系客服。", "cjk", 20, "#111111")
    return Drawn("ocr-zh-dialog", "ocr", page.finish(), page.lines, tags=["zh"])


def chinese_mixed(rng: random.Random) -> Drawn:
    page = Page(680, "#f8fafc", margin=24)
    page.text("账户设置 Account settings", "cjk", 24, "#0f172a")
    page.text(f"用户名：{rng.choice(NAMES)}", "cjk", 18, "#1e293b")
    page.text("语言：简体中文 (zh-CN)", "cjk", 18, "#1e293b")
    page.text(f"存储空间：已使用 {rng.randint(2, 14)} GB / 15 GB", "cjk", 18, "#1e293b")
    return Drawn("ocr-zh-en-mixed", "ocr", page.finish(), page.lines, tags=["zh", "mixed"])


def european(rng: random.Random) -> Drawn:
    page = Page(760, "#fffdf7", margin=26)
    day = rng.randint(10, 28)
    for line in (
        f"Ihre Bestellung wird am {day}. März geliefert.",
        "Größe: M · Menge: 2 · Rückgabe möglich",
        "Votre réservation à Genève est confirmée.",
        "¿Necesitas ayuda? Escríbenos a las 9:00.",
    ):
        page.text(line, "serif", 20, "#1c1917")
    return Drawn("ocr-de-fr-es", "ocr", page.finish(), page.lines, tags=["de", "fr", "es"])


def jpeg_noisy(rng: random.Random) -> Drawn:
    page = Page(700, "#ffffff", margin=24)
    sender = rng.choice(NAMES)
    page.text(f"From: {sender}", "liberation-sans-bold", 17, "#111111")
    page.text(f"Subject: Minutes of the {rng.choice(CITIES)} meeting", "liberation-sans", 17,
              "#111111")
    page.rule("#dddddd")
    page.text("Hi all, the budget review moves to Thursday.", "liberation-sans", 17, "#222222")
    page.text("Please send your slides by noon.", "liberation-sans", 17, "#222222")
    image = add_noise(page.finish(), rng)
    return Drawn("ocr-email-jpeg-noise", "ocr", image, page.lines, tags=["jpeg", "noise"],
                 jpeg_quality=40)


def exif_rotated(rng: random.Random) -> Drawn:
    page = _dialog(rng, LIGHT, "liberation-sans", 16)
    return Drawn("ocr-dialog-exif-rotated", "ocr", page.finish(), page.lines,
                 tags=["exif-rotated"], exif_orientation=6)


def ocr_cases(rng: random.Random) -> list[Drawn]:
    return [
        dialog(rng, dark=False, face="sans", size=16),
        dialog(rng, dark=True, face="liberation-sans", size=16),
        settings_small(rng),
        banner_large(rng),
        code(rng),
        terminal(rng),
        table(rng),
        chinese_dialog(rng),
        chinese_mixed(rng),
        european(rng),
        jpeg_noisy(rng),
        exif_rotated(rng),
    ]


# --- triage ---------------------------------------------------------------------------------------

# (area, title, message, code, severity, personal data shown as (label, value, kind) or None)
TRIAGE = (
    ("Checkout", "Payment failed", "Your card was declined.", "ERR_CARD_DECLINED", "blocker",
     ("Email", "{first}.{last}@example.com", "email")),
    ("Sign in", "Sign-in failed", "The two-factor code is invalid or expired.", "AUTH-401",
     "blocker", None),
    ("Reports", "Export failed", "The PDF is larger than the 25 MB limit.", "E413", "major",
     None),
    ("Profile", "Photo not updated", "The picture could not be cropped. Try again later.",
     "IMG-204", "minor", ("Phone", "+1 415 555 {digits}", "phone")),
)


def triage_cases(rng: random.Random) -> list[Drawn]:
    out = []
    for number, (area, title, message, code_text, severity, personal) in enumerate(TRIAGE, 1):
        dark = number % 2 == 0
        theme = DARK if dark else LIGHT
        page = Page(760, theme["background"], margin=30)
        page.text(f"Acme Cloud · {area}", "sans-bold", 18, theme["muted"])
        page.rule(theme["rule"], 16)
        page.text(title, "sans-bold", 26, theme["accent"])
        page.text(message, "sans", 18, theme["text"])
        page.text(f"Error code: {code_text}", "sans", 16, theme["muted"])
        kinds: list[str] = []
        if personal is not None:
            label, pattern, kind = personal
            first, last = rng.choice(NAMES).lower().split()
            value = pattern.format(first=first, last=last, digits=rng.randint(1000, 9999))
            page.text(f"{label}: {value}", "sans", 16, theme["text"])
            kinds.append(kind)
        page.skip(8)
        page.button("Try again", page.margin, "sans", 16, theme["button"], theme["button_text"])
        page.record("Try again", 48)
        fields = {"error_message": message, "error_code": code_text, "severity": severity,
                  "personal_data": kinds}
        out.append(Drawn(f"triage-{area.lower().replace(' ', '-')}", "triage", page.finish(),
                         page.lines, fields=fields, tags=["dark" if dark else "light"]))
    return out
