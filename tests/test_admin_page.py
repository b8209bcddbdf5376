"""The admin page (/admin) in headless Chromium (Debian's chromium, driven by Playwright): signing
in with the admin key (an API key is refused), the chart of requests and engine seconds per day,
the users table, and API keys created and revoked from the page, which work and stop at once.

Set VLBOT_ADMIN_SCREENSHOT=docs/admin-page.png to also save the screenshot there.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import httpx
import pytest

from bot.admin import AdminPolicy, AdminService
from bot.admin_types import day_start, utc_day
from bot.job_hooks import JobOutcome
from bot.models import ConversationId, User
from tests.http_helpers import running
from tests.test_web_page import ARGS, CHROMIUM

playwright_api = pytest.importorskip("playwright.async_api")
expect = playwright_api.expect
pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="Debian's chromium is not installed")

ADMIN = "admin-secret-key-0123456789"
SETTINGS_KEY = "settings-user-key-0123456789"
# (platform, user id, name, chat) and their jobs per day, for the last days (oldest first)
PEOPLE = [
    ("telegram", "1001", "Ana", "1001", [3, 5, 2, 0, 6, 8, 4, 7, 9, 5, 3, 6, 4, 2]),
    ("slack", "U02BEN", "Ben", "C0SUPPORT", [1, 2, 4, 0, 1, 0, 5, 6, 2, 4, 7, 3, 5, 1]),
    ("telegram", "1002", "Chen", "-100777", [0, 0, 1, 0, 2, 3, 0, 1, 4, 2, 2, 3, 1, 0]),
]
QUIET_DAY = 3  # nobody asked anything then


async def seed_ledger(admin: AdminService) -> int:
    """Jobs of the last 14 days as the runner records them; returns how many."""
    today = day_start(time.time())
    total = 0
    for platform, user, name, chat, per_day in PEOPLE:
        for index, count in enumerate(per_day):
            at = today - (len(per_day) - 1 - index) * 86400 + 9 * 3600  # 09:00 UTC that day
            for n in range(count):
                await admin.ledger.job_finished(JobOutcome(
                    conversation=ConversationId(platform, chat),
                    user=User(platform_id=user, display_name=name),
                    origin={},
                    status="answered",
                    images=1 + n % 2,
                    engine_s=4.0 + 3 * (n % 3),
                    first_token_s=1.2 + 0.1 * n,
                    finished_at=min(at + n * 60, time.time() - 1),
                ))
                total += 1
    return total


async def test_admin_page_chart_users_and_keys(tmp_path: Path) -> None:
    http = {"admin_key": ADMIN, "api_keys": [SETTINGS_KEY]}
    async with running(tmp_path, http=http, admin_policy=AdminPolicy()) as server, \
            playwright_api.async_playwright() as p:
        seeded = await seed_ledger(server.stack.core.admin)
        browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        page = await browser.new_page(viewport={"width": 1000, "height": 900})
        page.on("dialog", lambda dialog: dialog.accept())  # "Revoke this key?"
        await page.goto(server.url + "/admin")

        # an API key is not the admin key: refused, nothing shown
        await page.fill("#admin-key", SETTINGS_KEY)
        await page.click("#signin button")
        await expect(page.locator("#error")).to_have_text(
            "This API key may not use the admin API; use the admin key."
        )
        await expect(page.locator("#board")).to_be_hidden()

        await page.fill("#admin-key", ADMIN)
        await page.click("#signin button")
        await expect(page.locator("#board")).to_be_visible()
        await expect(page.locator("#error")).to_be_hidden()

        # the chart: one bar per day of the last 14, as tall as that day's requests
        bars = page.locator("#chart rect.bar")
        await expect(bars).to_have_count(14)
        heights = [float(await bars.nth(i).get_attribute("height") or "nan") for i in range(14)]
        per_day = [sum(person[4][i] for person in PEOPLE) for i in range(14)]
        assert heights[QUIET_DAY] == 0 < min(h for i, h in enumerate(heights) if i != QUIET_DAY)
        busiest = per_day.index(max(per_day))
        for h, n in zip(heights, per_day, strict=True):  # in proportion to the requests of each day
            assert h * per_day[busiest] == pytest.approx(heights[busiest] * n, abs=0.01)
        day_of_busiest = utc_day(day_start(time.time()) - (13 - busiest) * 86400)
        assert (await bars.nth(busiest).locator("title").text_content() or "").startswith(
            f"{day_of_busiest}: {per_day[busiest]} requests"
        )
        await expect(page.locator("#chart polyline.line")).to_have_count(1)
        await expect(page.locator("#totals")).to_contain_text(f"Requests{seeded}")

        # the users table, most engine time first
        rows = page.locator("#users tbody tr")
        await expect(rows).to_have_count(3)
        await expect(rows.nth(0).locator("td").nth(0)).to_have_text("telegram:user:1001")
        await expect(rows.nth(0).locator("td").nth(1)).to_have_text("Ana")
        await expect(rows.nth(0).locator("td").nth(2)).to_have_text(str(sum(PEOPLE[0][4])))

        # a key made on the page works at once
        await page.fill("#key-name", "ci-bot")
        await page.fill("#key-requests", "5")
        await page.click("#new-key button")
        await expect(page.locator("#secret")).to_be_visible()
        secret = await page.locator("#secret-value").text_content() or ""
        row = page.locator("#keys tbody tr", has_text="ci-bot")
        await expect(row.locator("td").nth(3)).to_have_text("requests 5")
        await expect(row.locator("td").nth(4)).to_have_text("active")
        assert await chat(server.url, secret) == 200

        shot = tmp_path / "admin-page.png"
        await page.screenshot(path=str(shot), full_page=True)
        if os.environ.get("VLBOT_ADMIN_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["VLBOT_ADMIN_SCREENSHOT"])

        # ... and revoked from the page stops at once
        await row.locator("button.revoke").click()
        await expect(row).to_have_class("revoked")
        await expect(row.locator("button.revoke")).to_have_count(0)
        assert await chat(server.url, secret) == 401

        # the admin key lives in the tab's session: a reload shows the board again
        await page.reload()
        await expect(page.locator("#board")).to_be_visible()
        await expect(page.locator("#keys tbody tr.revoked")).to_have_count(1)
        assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        await browser.close()


async def chat(url: str, key: str) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=20) as http:
        answer = await http.post(
            "/v1/chat/completions",
            json={"model": "vlbot", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Authorization": f"Bearer {key}"},
        )
    return answer.status_code
