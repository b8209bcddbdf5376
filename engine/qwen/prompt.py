"""Turn a conversation (history + the new message) into Qwen-VL chat-template input.

The Qwen processors take a list of chat messages whose content items are ``{"type": "image"}``
placeholders and ``{"type": "text", "text": ...}`` pieces, plus one flat list of images in the order
their placeholders appear. Earlier turns are rebuilt with their images (the model answers a
follow-up question by looking at the picture again), a message may hold several images, and the
order of parts inside a message is kept.

Images are decoded here through ``engine.intake.open_image`` so every image the model sees has
passed the same limits and has been fitted into the pixel budget.
"""

from __future__ import annotations

import hashlib
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from bot.models import ImagePart, InputRejected, Message, Part, Role, TextPart, Turn
from engine.intake import IntakeLimits, open_image

logger = logging.getLogger("vlbot.engine")

ChatMessage = dict[str, Any]
ImageOpener = Callable[[ImagePart, IntakeLimits], Image.Image]

# Text put where an earlier image can no longer be shown (dropped by max_images, or unreadable).
OMITTED_IMAGE = "[an earlier image, not shown again]"


@dataclass(frozen=True)
class Prompt:
    """Chat-template messages and the images for their ``{"type": "image"}`` items, in order."""

    messages: list[ChatMessage]
    images: list[Image.Image] = field(default_factory=list)
    # One digest of each shown image's encoded bytes, in the same order (for KV-cache reuse: two
    # different pictures of the same size give the same token ids).
    digests: list[bytes] = field(default_factory=list)

    @property
    def image_count(self) -> int:
        return len(self.images)


@dataclass(frozen=True)
class _Entry:
    role: str
    parts: tuple[Part, ...]
    is_new: bool


def _entries(
    history: Sequence[Turn], message: Message, system_prompt: str | None
) -> list[_Entry]:
    entries: list[_Entry] = []
    if system_prompt and system_prompt.strip():
        entries.append(_Entry("system", (TextPart(system_prompt.strip()),), False))
    for turn in history:
        if turn.role == Role.ASSISTANT:
            # The model's own answers are text; an image attached to one is not shown again.
            parts: tuple[Part, ...] = tuple(p for p in turn.parts if isinstance(p, TextPart))
            entries.append(_Entry("assistant", parts, False))
        else:
            entries.append(_Entry("user", turn.parts, False))
    entries.append(_Entry("user", message.parts, True))
    return entries


def _kept_history_images(entries: Sequence[_Entry], max_images: int | None) -> set[int]:
    """Ids of the history ImageParts to show: all, or the most recent ones that fit max_images."""
    new_count = sum(1 for e in entries if e.is_new for p in e.parts if isinstance(p, ImagePart))
    older = [id(p) for e in entries if not e.is_new for p in e.parts if isinstance(p, ImagePart)]
    if max_images is None:
        return set(older)
    room = max(0, max_images - new_count)
    return set(older[len(older) - room :]) if room else set()


def build_prompt(
    history: Sequence[Turn],
    message: Message,
    *,
    limits: IntakeLimits,
    system_prompt: str | None = None,
    max_images: int | None = None,
    opener: ImageOpener = open_image,
) -> Prompt:
    """Build the chat messages and the ordered image list for one generation.

    - The new message's images are always included; an unusable one raises ``InputRejected``.
    - History images are included (most recent first when ``max_images`` limits the total); one
      that cannot be opened any more, or does not fit the limit, becomes a short text note instead,
      so an old picture never makes a new question fail.
    - Empty turns are skipped; text parts are passed verbatim (the engine has the template encode
      any control-token look-alikes in them as plain text).
    """
    entries = _entries(history, message, system_prompt)
    kept = _kept_history_images(entries, max_images)
    messages: list[ChatMessage] = []
    images: list[Image.Image] = []
    digests: list[bytes] = []
    for entry in entries:
        content: list[dict[str, Any]] = []
        for part in entry.parts:
            if isinstance(part, TextPart):
                if part.text.strip():
                    content.append({"type": "text", "text": part.text})
                continue
            if entry.is_new:
                images.append(opener(part, limits))
                digests.append(image_digest(part))
                content.append({"type": "image"})
                continue
            image = _open_history_image(part, limits, opener) if id(part) in kept else None
            if image is None:
                content.append({"type": "text", "text": OMITTED_IMAGE})
            else:
                images.append(image)
                digests.append(image_digest(part))
                content.append({"type": "image"})
        if content:
            messages.append({"role": entry.role, "content": content})
    if not messages or messages[-1]["role"] != "user":
        raise InputRejected("empty_question", "the message has neither text nor images")
    return Prompt(messages, images, digests)


def image_digest(part: ImagePart) -> bytes:
    """A digest of an image's encoded bytes: equal for the same picture sent again."""
    return hashlib.blake2b(part.data, digest_size=16).digest()


def _open_history_image(
    part: ImagePart, limits: IntakeLimits, opener: ImageOpener
) -> Image.Image | None:
    try:
        return opener(part, limits)
    except InputRejected as e:
        logger.warning("an earlier image is left out of the prompt (%s)", e.code)
        return None


def count_images(history: Sequence[Turn], message: Message) -> int:
    """How many images a prompt for this conversation would show without a max_images limit."""
    older = sum(len(t.images) for t in history if t.role != Role.ASSISTANT)
    return older + len(message.images)


class RecentImages:
    """An ImageOpener that keeps the last few images it opened, by the digest of their bytes and
    the limits: a follow-up question rebuilds its prompt with the earlier turns' images, and
    decoding and fitting a 1080p photo again cost ~45 ms of its first token. Images that fail
    to open are not kept (the next attempt raises again). One thread at a time."""

    def __init__(self, opener: ImageOpener = open_image, keep: int = 8) -> None:
        self._opener = opener
        self._keep = keep
        self._images: OrderedDict[tuple[bytes, IntakeLimits], Image.Image] = OrderedDict()

    def __call__(self, part: ImagePart, limits: IntakeLimits) -> Image.Image:
        key = (image_digest(part), limits)
        image = self._images.get(key)
        if image is not None:
            self._images.move_to_end(key)
            return image
        image = self._opener(part, limits)
        self._images[key] = image
        while len(self._images) > self._keep:
            self._images.popitem(last=False)
        return image


class ProcessedImages:
    """The image processor's `preprocess`, remembering its result for the last list of images
    it was given (the same image objects, which RecentImages hands a follow-up, and the same
    options): a follow-up question's prompt shows the earlier image again, and resizing,
    normalizing and cutting a 1080p photo into patches costs ~60 ms of its first token. One
    result is kept (24 MB of float32 pixels at 1080p) until the next call with other images."""

    def __init__(self, preprocess: Callable[..., Any]) -> None:
        self._preprocess = preprocess
        self._images: tuple[weakref.ref[Any], ...] = ()
        self._options = ""
        self._result: Any = None

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> Any:
        given: list[Any] = []
        shape = _flatten(images, given)  # the processor nests them per prompt
        options = repr((shape, args, sorted(kwargs.items())))
        if (
            self._result is not None
            and options == self._options
            and len(given) == len(self._images)
            and all(ref() is image for ref, image in zip(self._images, given, strict=True))
        ):
            return self._result
        result = self._preprocess(images, *args, **kwargs)
        try:  # inputs without weak references (arrays) are not remembered
            self._images = tuple(weakref.ref(image) for image in given)
        except TypeError:
            self._images, self._result = (), None
            return result
        self._options, self._result = options, result
        return result


def _flatten(images: Any, into: list[Any]) -> Any:
    """Append the leaves of nested lists/tuples to `into`; returns the nesting's shape."""
    if isinstance(images, (list, tuple)):
        return [_flatten(item, into) for item in images]
    into.append(images)
    return None


def remember_processed_images(processor: Any) -> bool:
    """Give the processor's image processor a ProcessedImages; False where it has none."""
    image_processor = getattr(processor, "image_processor", None)
    preprocess = getattr(image_processor, "preprocess", None)
    if image_processor is None or preprocess is None:
        return False
    image_processor.preprocess = ProcessedImages(preprocess)
    return True

