"""The Slack adapter (slack-bolt AsyncApp): mentions, DMs, image threads, the slash command."""

from adapters.slack.adapter import SlackAdapter

__all__ = ["SlackAdapter"]
