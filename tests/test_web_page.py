"""The web chat page in headless Chromium (Debian's chromium, driven by Playwright).

Set VLBOT_WEB_SCREENSHOT=docs/web-chat.png to also save the screenshot there.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest

from bot.models import Message, Turn
from bot.texts import text
from tests.http_helpers import CheckingEngine, png, running

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
playwright_api = pytest.importorskip("playwright.async_api")
# Waits use locators and expect() (no JavaScript predicates): the page's CSP forbids eval, which
# Playwright's polled string predicates need.
expect = playwright_api.expect
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

DROP_FILE = """([b64, name, type, kind]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const dt = new DataTransfer();
  dt.items.add(new File([bytes], name, { type }));
  const event = kind === "paste"
    ? new ClipboardEvent("paste", { clipboardData: dt, bubbles: true, cancelable: true })
    : new DragEvent("drop", { dataTransfer: dt, bubbles: true, cancelable: true });
  (kind === "paste" ? document.getElementById("prompt") : document.body).dispatchEvent(event);
}"""

RECORD_TEXTS = """() => {
  window.__texts = [];
  new MutationObserver(() => {
    const last = [...document.querySelectorAll(".msg.assistant .text")].pop();
    if (last) window.__texts.push(last.textContent);
  }).observe(document.getElementById("log"), { subtree: true, childList: true, characterData: true });
}"""


def script(history: Sequence[Turn], message: Message) -> str:
    if "screenshot of a problem" in message.text:  # the triage preset's prompt
        from tests.test_presets import GOOD

        return GOOD["triage"]
    n = len(message.images) + sum(len(t.images) for t in history)
    return f"I see {n} image(s) and {len(history)} earlier turns; you asked {message.text}"


async def test_web_chat_upload_stream_follow_up_copy_reload(tmp_path: Path) -> None:
    engine = CheckingEngine(reply=script, delay_s=0.05)
    red, blue = png(400, 300, (220, 40, 40)), png(300, 300, (40, 60, 220))
    async with running(tmp_path, engine) as server, playwright_api.async_playwright() as p:
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        context = await browser.new_context(viewport={"width": 900, "height": 760})
        await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
        page = await context.new_page()
        await page.goto(server.url + "/")
        await page.wait_for_selector("#model:text('script')")

        # picker, then drag-and-drop and paste: three images pending
        (tmp_path / "red.png").write_bytes(red)
        await page.set_input_files("#file", str(tmp_path / "red.png"))
        await page.evaluate(
            DROP_FILE, [base64.b64encode(blue).decode(), "blue.png", "image/png", "drop"]
        )
        await page.evaluate(
            DROP_FILE, [base64.b64encode(red).decode(), "pasted.png", "image/png", "paste"]
        )
        await expect(page.locator("#pending .thumb")).to_have_count(3)
        await page.locator(".thumb button").nth(2).click()  # remove one again
        await expect(page.locator("#pending .thumb")).to_have_count(2)

        await page.evaluate(RECORD_TEXTS)
        await page.fill("#prompt", "what is this?")
        await page.press("#prompt", "Enter")
        first = "I see 2 image(s) and 0 earlier turns; you asked what is this?"
        await page.wait_for_selector(f".msg.assistant .text:text-is('{first}')")
        seen = await page.evaluate("window.__texts")
        # "thinking…" was shown before the first piece (recorded, not waited for: on a busy
        # machine the answer can replace it before a wait sees it)
        assert "thinking…" in seen[: seen.index(next(t for t in seen if t and "thinking" not in t))]
        partial = [
            t for t in seen if t and t != first and first.startswith(t.strip()) and "thinking" not in t
        ]
        assert len(partial) >= 3  # the answer grew word by word
        assert await page.locator(".msg.user img").count() == 2

        await page.fill("#prompt", "and the colors?")
        await page.click("#send")
        second = "I see 2 image(s) and 2 earlier turns; you asked and the colors?"
        await page.wait_for_selector(f".msg.assistant .text:text-is('{second}')")

        await page.locator(".msg.assistant .copy").last.click()
        await page.wait_for_selector(".copy:text('Copied')")
        assert await page.evaluate("navigator.clipboard.readText()") == second

        await page.reload()
        await expect(page.locator(".msg")).to_have_count(4)
        assert await page.locator(".msg.assistant .text").all_text_contents() == [first, second]
        assert await page.locator(".msg.user img").count() == 2
        assert await page.locator(".msg.assistant .copy").count() == 2
        shot = tmp_path / "web-chat.png"
        await page.screenshot(path=str(shot))
        if os.environ.get("VLBOT_WEB_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["VLBOT_WEB_SCREENSHOT"])

        # a preset button: the validated result, rendered readably
        await page.click("button[data-preset=triage]")
        # (selectors, not a polled JS predicate: the page's CSP forbids eval)
        result = page.locator(".msg.assistant .text:has-text('Billing')")
        await result.wait_for()
        assert "blocker" in (await result.text_content() or "")

        # errors from the server are shown; phone width has no sideways scrolling
        await page.set_viewport_size({"width": 375, "height": 700})
        await page.evaluate(
            DROP_FILE, [base64.b64encode(b"%PDF-1.4 nope").decode(), "x.png", "image/png", "drop"]
        )
        await expect(page.locator("#pending .thumb")).to_have_count(1)
        await page.fill("#prompt", "read this")
        await page.press("#prompt", "Enter")
        await expect(
            page.locator(".msg.error .text").filter(
                has_text=re.compile("^" + re.escape(text("not_an_image")) + "$"))
        ).to_have_count(1)
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        await browser.close()
