"""OpenAI's chat-completions format, both ways: requests (JSON or the seed's multipart form) in,
completion objects and stream chunks out, with token estimates for `usage`."""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
import time
import urllib.parse
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from PIL import Image
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser

from adapters.http.errors import ApiError, bad_request
from bot.models import ImagePart, Message, Part, Role, TextPart, Turn, size_text
from bot.presets import get_preset, preset_for_response_format, preset_names
from bot.remote_images import RemoteImageError, RemoteImageFetcher

CONVERSATION_ID_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")


@dataclass
class ChatRequest:
    message: Message
    history: list[Turn] = field(default_factory=list)  # earlier turns sent in `messages`
    conversation_id: str | None = None
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    temperature: float | None = None
    preset: str | None = None  # run a preset (validated JSON)
    json_only: bool = False  # answer with the preset's JSON alone (response_format)

    def params(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.max_tokens is not None:
            out["max_new_tokens"] = self.max_tokens
        if self.temperature is not None:
            out["temperature"] = self.temperature
        return out


def check_conversation_id(value: Any) -> str | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 64 or not set(value) <= CONVERSATION_ID_CHARS:
        raise bad_request(
            "conversation_id must be 1-64 letters, digits, '-', '_' or '.'", param="conversation_id"
        )
    return value


class Parser:
    def __init__(self, max_image_bytes: int, fetcher: RemoteImageFetcher | None) -> None:
        self.max_image_bytes = max_image_bytes
        self.fetcher = fetcher

    # --- JSON ----------------------------------------------------------------------------------

    async def parse_json(self, body: bytes) -> ChatRequest:
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise bad_request(f"The request body is not valid JSON: {exc}", code="invalid_json") from None
        except RecursionError:
            raise too_deep() from None
        check_tree(data)
        if not isinstance(data, dict):
            raise bad_request("The request body must be a JSON object.", code="invalid_json")
        check_supported(data)
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise bad_request("'messages' is required: a non-empty list.", param="messages")
        system: list[str] = []
        turns: list[Turn] = []
        for index, item in enumerate(messages):
            if not isinstance(item, dict):
                raise bad_request(f"messages[{index}] must be an object.", param=f"messages[{index}]")
            role = item.get("role")
            parts = await self._parts(item.get("content"), f"messages[{index}].content")
            if role in ("system", "developer"):
                system.extend(p.text for p in parts if isinstance(p, TextPart))
            elif role in ("user", "assistant"):
                if parts:
                    turns.append(Turn(Role(role), tuple(parts)))
            else:
                raise bad_request(
                    f"messages[{index}].role must be system, user or assistant, not {role!r}.",
                    param=f"messages[{index}].role",
                )
        if not turns or turns[-1].role is not Role.USER:
            raise bad_request("The last message must be a user message with content.", param="messages")
        history = turns[:-1]
        while history and history[0].role is not Role.USER:
            history.pop(0)
        current = turns[-1]
        if system:
            preamble = TextPart("\n".join(system))
            if history:
                history[0] = Turn(Role.USER, (preamble, *history[0].parts))
            else:
                current = Turn(Role.USER, (preamble, *current.parts))
        stream_options = data.get("stream_options") or {}
        return ChatRequest(
            message=Message(current.parts),
            history=history,
            conversation_id=check_conversation_id(data.get("conversation_id")),
            stream=_bool(data.get("stream", False), "stream"),
            include_usage=isinstance(stream_options, dict) and bool(stream_options.get("include_usage")),
            max_tokens=_max_tokens(data.get("max_completion_tokens", data.get("max_tokens"))),
            temperature=_temperature(data.get("temperature")),
            **_preset(data.get("preset"), data.get("response_format")),
        )

    async def _parts(self, content: Any, where: str) -> list[Part]:
        if content is None:
            return []
        if isinstance(content, str):
            return [TextPart(content)] if content.strip() else []
        if not isinstance(content, list):
            raise bad_request(f"{where} must be a string or a list of parts.", param=where)
        parts: list[Part] = []
        for index, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text" and isinstance(item.get("text"), str):
                if item["text"].strip():
                    parts.append(TextPart(item["text"]))
            elif kind == "image_url":
                ref = item.get("image_url")
                url = ref.get("url") if isinstance(ref, dict) else ref
                if not isinstance(url, str) or not url:
                    raise bad_request(f"{where}[{index}].image_url.url is missing.", param=where)
                parts.append(await self._image(url, f"{where}[{index}]"))
            else:
                raise bad_request(
                    f"{where}[{index}] must be a text or image_url part.", param=f"{where}[{index}]"
                )
        return parts

    async def _image(self, url: str, where: str) -> ImagePart:
        if url.startswith("data:"):
            header, sep, payload = url[5:].partition(",")
            if not sep:
                raise bad_request(f"{where}: not a valid data: URL.", code="invalid_image_url", param=where)
            mime, *flags = header.split(";")
            try:
                if "base64" in flags:
                    data = base64.b64decode(payload, validate=False)
                else:
                    data = urllib.parse.unquote_to_bytes(payload)
            except (binascii.Error, ValueError):
                raise bad_request(
                    f"{where}: the data: URL is not valid base64.", code="invalid_image_url", param=where
                ) from None
            self._check_size(len(data))
            return ImagePart(data, mime or "application/octet-stream", None)
        if url.startswith(("http://", "https://")):
            if self.fetcher is None:
                raise bad_request(
                    f"{where}: remote image URLs are turned off on this server; send the image as a "
                    "data: URL (base64) or enable VLBOT_HTTP__ALLOW_REMOTE_IMAGES.",
                    code="remote_images_disabled",
                    param=where,
                )
            try:
                return await self.fetcher.fetch(url)
            except RemoteImageError as exc:
                raise bad_request(f"{where}: {exc}", code="invalid_image_url", param=where) from None
        raise bad_request(f"{where}: image URLs must be data: or http(s) URLs.", code="invalid_image_url")

    def _check_size(self, size: int) -> None:
        if size > self.max_image_bytes:
            raise ApiError(
                413,
                f"That image is {size_text(size)}; the limit is {size_text(self.max_image_bytes)}.",
                code="too_large",
            )

    # --- the seed's multipart form ----------------------------------------------------------------

    async def parse_form(self, headers: Headers, body: bytes) -> ChatRequest:
        """`image` file(s), `prompt`, optional `conversation_id`, `stream`, `max_tokens`. Files stay
        in memory (the body is already bounded): an upload is never written to disk."""

        async def replay() -> AsyncGenerator[bytes, None]:
            yield body

        parser = MultiPartParser(headers, replay(), max_files=20, max_fields=50)
        parser.spool_max_size = len(body) + 1
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            raise bad_request(f"The multipart form could not be read: {exc}", code="invalid_form") from None
        try:
            images: list[ImagePart] = []
            for upload in form.getlist("image"):
                if not isinstance(upload, UploadFile):
                    raise bad_request("'image' must be a file upload.", param="image")
                data = await upload.read()
                self._check_size(len(data))
                mime = upload.content_type or "application/octet-stream"
                images.append(ImagePart(data, mime, upload.filename))
            prompt = form.get("prompt")
            conversation = form.get("conversation_id")
            stream = form.get("stream")
            max_tokens = form.get("max_tokens")
            preset = form.get("preset")
        finally:
            await form.close()
        if prompt is not None and not isinstance(prompt, str):
            raise bad_request("'prompt' must be a text field.", param="prompt")
        if not (prompt or "").strip():  # as the seed service answers: a prompt is required
            raise bad_request("The form needs a 'prompt' (and an 'image' file).", param="prompt")
        assert isinstance(prompt, str)
        check_tree(prompt)
        return ChatRequest(
            message=Message.of(prompt.strip(), *images),
            conversation_id=check_conversation_id(conversation if isinstance(conversation, str) else None),
            stream=isinstance(stream, str) and stream.lower() in ("1", "true", "yes"),
            max_tokens=_max_tokens(int(max_tokens) if isinstance(max_tokens, str) and max_tokens.isdigit()
                                   else None),
            **_preset(preset if isinstance(preset, str) and preset else None, None),
        )


MAX_JSON_DEPTH = 32  # a chat request nests about 5 levels deep


def too_deep() -> ApiError:
    return bad_request(
        f"The request body is nested too deeply (more than {MAX_JSON_DEPTH} levels).",
        code="invalid_json",
    )


def check_tree(data: Any) -> None:
    """Refuse JSON nested deeper than MAX_JSON_DEPTH and text that is not valid Unicode (a lone
    UTF-16 surrogate such as JSON's "\\ud800" decodes but can be neither stored nor answered).
    Iterative: no recursion limit to hit."""
    stack: list[tuple[Any, int]] = [(data, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    raise bad_request(
                        "The request contains text that is not valid Unicode (a lone UTF-16 "
                        "surrogate, such as \\ud800); send UTF-8 text.",
                        code="invalid_text",
                    ) from None
        elif isinstance(value, (dict, list)):
            if depth >= MAX_JSON_DEPTH:
                raise too_deep()
            items = [*value.keys(), *value.values()] if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items)


# Request fields of OpenAI's API that vlbot does not implement: answered 400 naming the field
# (as vLLM does), never silently ignored. A value in the tuple is the harmless default.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none", "auto"),  # with no tools, "auto" asks for nothing
    "functions": (None, []),
    "function_call": (None, "none", "auto"),
    "stop": (None, [], ""),
    "logit_bias": (None, {}),
    "audio": (None,),
    "prediction": (None,),
    "modalities": (None, ["text"]),
}


def check_supported(data: dict[str, Any]) -> None:
    for name, harmless in UNSUPPORTED.items():
        value = data.get(name)
        if not any(value == ok and type(value) is type(ok) for ok in harmless):
            raise bad_request(
                f"'{name}' is not supported by this server (value {json.dumps(value)[:40]}).",
                code="unsupported_parameter",
                param=name,
            )


def _preset(name: Any, response_format: Any) -> dict[str, Any]:
    """`preset` (a name) or `response_format` {"type": "json_schema", ...} with a preset's schema
    (see GET /v1/presets) → run that preset; with response_format the answer is its JSON alone."""
    if name is not None:
        preset = get_preset(name) if isinstance(name, str) else None
        if preset is None:
            raise bad_request(f"Unknown preset {name!r}; use one of: {', '.join(preset_names())}.",
                              param="preset")
        return {"preset": preset.name}
    if response_format is None or response_format == {"type": "text"}:
        return {}
    if isinstance(response_format, dict) and response_format.get("type") == "json_schema":
        found = preset_for_response_format(response_format)
        if found is not None:
            return {"preset": found.name, "json_only": True}
    raise bad_request(
        "response_format must be a json_schema of one of the presets "
        f"({', '.join(preset_names())}; GET /v1/presets lists them).", param="response_format",
    )


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise bad_request(f"'{name}' must be true or false.", param=name)
    return value


def _max_tokens(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise bad_request("'max_tokens' must be a positive integer.", param="max_tokens")
    return value


def _temperature(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 2:
        raise bad_request("'temperature' must be a number from 0 to 2.", param="temperature")
    return float(value)


# --- responses ---------------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """About four bytes of UTF-8 per token: for an engine that does not count its tokens."""
    return math.ceil(len(text.encode()) / 4) if text else 0


def visual_tokens(image: ImagePart, max_visual_tokens: int) -> int:
    """One token per 32x32 pixels of the image as the model sees it, within the budget."""
    try:
        with Image.open(io.BytesIO(image.data)) as img:
            width, height = img.size
    except Exception:
        return 0
    return max(1, min(max_visual_tokens, math.ceil(width * height / 1024)))


@dataclass
class Timing:
    started: float  # time.monotonic() when the request arrived
    first_token: float | None = None
    finished: float | None = None


def usage(prompt_tokens: int, completion_tokens: int, timing: Timing) -> dict[str, Any]:
    end = timing.finished or time.monotonic()
    out: dict[str, Any] = {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "total_time_ms": round((end - timing.started) * 1000),
    }
    if timing.first_token is not None:
        out["time_to_first_token_ms"] = round((timing.first_token - timing.started) * 1000)
    return out


def completion(
    rid: str,
    model: str,
    text: str,
    usage_: dict[str, Any],
    conversation: str | None,
    finish_reason: str = "stop",
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason}
        ],
        "usage": usage_,
    }
    if conversation:
        body["conversation_id"] = conversation
    return body


def chunk(
    rid: str,
    model: str,
    delta: dict[str, Any],
    finish_reason: str | None = None,
    usage_: dict[str, Any] | None = None,
) -> str:
    body: dict[str, Any] = {
        "id": f"chatcmpl-{rid}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
    }
    if usage_ is not None:
        body["usage"] = usage_
    return sse(body)


def sse(body: dict[str, Any] | str) -> str:
    payload = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return f"data: {payload}\n\n"
