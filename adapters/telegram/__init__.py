"""Telegram: photos, image documents and albums in; a placeholder streamed into by edits out."""

from adapters.telegram.adapter import TelegramAdapter

__all__ = ["TelegramAdapter"]
