"""Support-screenshot triage as a workflow (issue 24): each triage result is recorded, grouped
with repeats of the same error, sent to webhooks through the outbox, routed to on-call channels
by rules, and summed up in a daily digest per auto-triage place and in `vlbot triage-report`.

Kept light: bot/settings.py imports bot.triage.rules from here.
"""
