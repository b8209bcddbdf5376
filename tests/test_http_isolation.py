"""Callers are isolated: a conversation and its images belong to the principal that made them (an
API key, the web page's user); anyone else gets the same 404 as for an id that does not exist."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx

from tests.http_helpers import CheckingEngine, data_url, png, running

KEY_A, KEY_B = "sk-alice-0123456789", "sk-bob-9876543210"
WEB = ("team", "web-pass-123")
HTTP = {"api_keys": [KEY_A, KEY_B], "web_user": WEB[0], "web_password": WEB[1]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def ask(text: str, conversation: str, image: bytes | None = None) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": data_url(image)}})
    return {"model": "m", "conversation_id": conversation,
            "messages": [{"role": "user", "content": content}]}


async def recorded(http: httpx.AsyncClient, cid: str, turns: int, **auth: Any) -> dict[str, Any]:
    """The conversation once its last answer is recorded (just after it is delivered)."""
    for _ in range(200):
        got = await http.get(f"/v1/conversations/{cid}", **auth)
        if got.status_code == 200 and len(got.json()["turns"]) >= turns:
            return dict(got.json())
        await asyncio.sleep(0.02)
    raise AssertionError(f"{cid} never had {turns} turns")


async def test_other_keys_and_the_web_user_cannot_reach_a_conversation(tmp_path: Path) -> None:
    image = png(80, 60, (10, 200, 10))
    engine = CheckingEngine(reply=lambda h, m: f"{len(h)} earlier turns")
    async with running(tmp_path, engine, http=HTTP) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
            a = await http.post("/v1/chat/completions", json=ask("what?", "shared", image),
                                headers=bearer(KEY_A))
            assert a.status_code == 200, a.text
            mine = await recorded(http, "shared", 2, headers=bearer(KEY_A))
            sha = next(p["image"] for p in mine["turns"][0]["parts"] if "image" in p)

            unknown = await http.get("/v1/conversations/never-made", headers=bearer(KEY_B))
            unknown_image = await http.get(f"/v1/images/{'0' * 64}", headers=bearer(KEY_B))
            for other in ({"headers": bearer(KEY_B)}, {"auth": WEB}):
                read = await http.get("/v1/conversations/shared", **other)
                markdown = await http.get("/v1/conversations/shared?format=md", **other)
                picture = await http.get(f"/v1/images/{sha}", **other)
                deleted = await http.delete("/v1/conversations/shared", **other)
                for reply, same_as in ((read, unknown), (markdown, unknown), (deleted, unknown),
                                       (picture, unknown_image)):
                    assert reply.status_code == 404, reply.text
                    assert reply.json() == same_as.json()  # nothing tells "not yours" apart
                assert image not in picture.content

            # B writing to the same id gets a conversation of its own: it does not see A's turns
            b = await http.post("/v1/chat/completions", json=ask("and?", "shared"),
                                headers=bearer(KEY_B))
            assert b.json()["choices"][0]["message"]["content"] == "0 earlier turns"
            await recorded(http, "shared", 2, headers=bearer(KEY_B))

            # A's conversation and image are untouched by all of it
            again = await recorded(http, "shared", 2, headers=bearer(KEY_A))
            follow = await http.post("/v1/chat/completions", json=ask("more?", "shared"),
                                     headers=bearer(KEY_A))
            own_image = await http.get(f"/v1/images/{sha}", headers=bearer(KEY_A))
        rows = await server.stack.db.fetchall("SELECT DISTINCT conversation FROM turns")
    assert [t["parts"] for t in again["turns"]] == [t["parts"] for t in mine["turns"]]
    assert follow.json()["choices"][0]["message"]["content"] == "2 earlier turns"
    assert own_image.status_code == 200 and own_image.content == image
    stored = " ".join(r["conversation"] for r in rows)
    assert KEY_A not in stored and KEY_B not in stored  # owners by hash, never the key


async def test_the_web_users_conversations_are_its_own(tmp_path: Path) -> None:
    async with running(tmp_path, http=HTTP) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
            made = await http.post("/v1/chat/completions", json=ask("hi", "web-1", png()), auth=WEB)
            assert made.status_code == 200
            ours = await recorded(http, "web-1", 2, auth=WEB)
            sha = next(p["image"] for p in ours["turns"][0]["parts"] if "image" in p)
            by_key = await http.get("/v1/conversations/web-1", headers=bearer(KEY_A))
            image_by_key = await http.get(f"/v1/images/{sha}", headers=bearer(KEY_A))
            image_by_web = await http.get(f"/v1/images/{sha}", auth=WEB)
            gone = await http.delete("/v1/conversations/web-1", auth=WEB)
            after = await http.get("/v1/conversations/web-1", auth=WEB)
    assert by_key.status_code == 404 and image_by_key.status_code == 404
    assert image_by_web.status_code == 200
    assert gone.status_code == 200 and after.status_code == 404


async def test_deleting_someone_elses_id_does_not_cancel_their_running_answer(
    tmp_path: Path,
) -> None:
    engine = CheckingEngine(reply=lambda h, m: "slow words " * 5, delay_s=0.05)
    async with running(tmp_path, engine, http=HTTP) as server:
        async with httpx.AsyncClient(base_url=server.url, timeout=20) as http:
            running_a = asyncio.create_task(http.post(
                "/v1/chat/completions", json=ask("take your time", "busy"), headers=bearer(KEY_A)))
            for _ in range(1000):  # until the engine is generating A's answer
                if engine.running:
                    break
                await asyncio.sleep(0.01)
            deleted = await http.delete("/v1/conversations/busy", headers=bearer(KEY_B))
            answered = await running_a
    assert deleted.status_code == 404
    assert answered.status_code == 200
    assert answered.json()["choices"][0]["message"]["content"].startswith("slow words")
