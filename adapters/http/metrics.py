"""Prometheus metrics on a registry of this app's own (no global state: many apps per process in
tests, and nothing leaks between them). Served at GET /metrics in the text format."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from bot.adapter import CoreStatus
from bot.admin_types import PLATFORMS, UsageRecord

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "vlbot_http_requests", "HTTP requests answered", ["route", "method", "status"], registry=r
        )
        self.latency = Histogram(
            "vlbot_http_request_seconds",
            "Time to answer an HTTP request (to the last byte of a stream)",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "vlbot_time_to_first_token_seconds",
            "From accepting a request to the first piece of its answer",
            ["adapter"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens_per_s = Histogram(
            "vlbot_generation_tokens_per_second",
            "Completion tokens per second of generation (after the first token)",
            ["adapter"],
            buckets=(0.5, 1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=r,
        )
        self.completion_tokens = Counter(
            "vlbot_completion_tokens", "Completion tokens generated", ["adapter"], registry=r
        )
        self.jobs = Counter(
            "vlbot_jobs_finished", "Jobs finished, by adapter and outcome", ["adapter", "status"], registry=r
        )
        self.jobs_stored = Gauge(
            "vlbot_jobs_stored", "Jobs in the database, by status (all adapters)", ["status"], registry=r
        )
        self.queue_depth = Gauge("vlbot_queue_depth", "Jobs waiting in the queue", registry=r)
        self.running = Gauge("vlbot_jobs_running", "Jobs generating now", registry=r)
        self.engine_ready = Gauge("vlbot_engine_ready", "1 when the model is loaded", registry=r)
        self.uptime = Gauge("vlbot_uptime_seconds", "Seconds since the core started", registry=r)
        self.ledger = LedgerCounters()
        r.register(self.ledger)

    def track_status(self, status: Callable[[], CoreStatus]) -> None:
        """Read the queue gauges from the core at each scrape."""
        self.queue_depth.set_function(lambda: status().queue_depth)
        self.running.set_function(lambda: status().running)
        self.engine_ready.set_function(lambda: 1.0 if status().engine_state == "ready" else 0.0)
        self.uptime.set_function(lambda: status().uptime_s)
        self.registry.register(UpstreamCollector(status))
        self.registry.register(WebhookCollector(status))

    def set_job_counts(self, counts: dict[str, int]) -> None:
        for status, n in counts.items():
            self.jobs_stored.labels(status).set(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class UpstreamCollector(Collector):
    """engine=openai: each model server of the pool, labelled by its URL (without credentials),
    read from the core at each scrape (servers are known only then)."""

    def __init__(self, status: Callable[[], CoreStatus]) -> None:
        self._status = status

    def describe(self) -> list[Metric]:
        return []  # names checked at collect time: nothing to read before the core runs

    def collect(self) -> Iterator[Metric]:
        upstreams = self._status().upstreams
        if not upstreams:
            return
        gauges = {
            "up": GaugeMetricFamily("vlbot_upstream_up", "1 when the model server is up", labels=["server"]),
            "in_flight": GaugeMetricFamily(
                "vlbot_upstream_in_flight", "Requests in flight to the model server", labels=["server"]
            ),
            "latency_s": GaugeMetricFamily(
                "vlbot_upstream_first_token_seconds",
                "Recent time to first token of the model server",
                labels=["server"],
            ),
        }
        counters = {
            "requests": CounterMetricFamily(
                "vlbot_upstream_requests", "Requests sent to the model server", labels=["server"]
            ),
            "failures": CounterMetricFamily(
                "vlbot_upstream_failures",
                "Failed requests and health probes of the model server",
                labels=["server"],
            ),
            "failovers": CounterMetricFamily(
                "vlbot_upstream_failovers",
                "Requests that failed on the model server before their first token and went to another",
                labels=["server"],
            ),
        }
        for u in upstreams:
            gauges["up"].add_metric([u.server], 1.0 if u.up else 0.0)
            gauges["in_flight"].add_metric([u.server], u.in_flight)
            gauges["latency_s"].add_metric([u.server], u.latency_s)
            counters["requests"].add_metric([u.server], u.requests)
            counters["failures"].add_metric([u.server], u.failures)
            counters["failovers"].add_metric([u.server], u.failovers)
        yield from gauges.values()
        yield from counters.values()


class WebhookCollector(Collector):
    """Outbound webhook events in the outbox by state (pending, delivered, dead: dead letters
    wait for an operator), read from the core at each scrape."""

    def __init__(self, status: Callable[[], CoreStatus]) -> None:
        self._status = status

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        counts = self._status().webhooks
        if counts is None:
            return
        events = GaugeMetricFamily(
            "vlbot_webhook_events", "Outbound webhook events in the outbox, by state", labels=["state"]
        )
        for state, n in counts.items():
            events.add_metric([state], n)
        yield events


LEDGER_MARGIN_S = 300.0  # rows may be written a little after the time they carry


class LedgerCounters(Collector):
    """Counters per platform read from the usage ledger (all replicas' jobs on a shared
    database): jobs by outcome, images, engine seconds, refused messages by reason. No per-user
    labels. Each `refresh` (at a scrape) adds the rows settled since the last one; rows carrying
    a time a little before it (written late) are still counted, each once."""

    def __init__(self) -> None:
        self._requests: dict[tuple[str, str], int] = defaultdict(int)
        self._images: dict[str, int] = defaultdict(int)
        self._engine_s: dict[str, float] = defaultdict(float)
        self._rejected: dict[tuple[str, str], int] = defaultdict(int)
        self._until = 0.0  # the newest row's time counted so far
        self._recent: set[tuple[float, str, str | None, str, str]] = set()
        self._lock = asyncio.Lock()

    async def refresh(self, records: Callable[[float], Awaitable[list[UsageRecord]]]) -> None:
        async with self._lock:
            for r in await records(max(0.0, self._until - LEDGER_MARGIN_S)):
                key = (r.finished_at, r.conversation, r.job_id, r.status, r.user_id)
                if key in self._recent:
                    continue
                self._recent.add(key)
                self._until = max(self._until, r.finished_at)
                if r.status == "rejected":
                    self._rejected[(r.platform, r.reason or "unknown")] += 1
                else:
                    self._requests[(r.platform, r.status)] += 1
                    self._images[r.platform] += r.images
                    self._engine_s[r.platform] += r.engine_s
            cutoff = self._until - LEDGER_MARGIN_S
            self._recent = {k for k in self._recent if k[0] >= cutoff}

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "vlbot_usage_requests", "Jobs settled, by platform and outcome (usage ledger)",
            labels=["platform", "status"],
        )
        images = CounterMetricFamily(
            "vlbot_usage_images", "Images in settled jobs, by platform (usage ledger)", labels=["platform"]
        )
        engine_s = CounterMetricFamily(
            "vlbot_usage_engine_seconds", "Engine time spent on jobs, by platform (usage ledger)",
            labels=["platform"],
        )
        rejected = CounterMetricFamily(
            "vlbot_usage_rejected", "Messages refused before they became jobs, by platform and reason",
            labels=["platform", "reason"],
        )
        for platform in PLATFORMS:
            images.add_metric([platform], self._images[platform])
            engine_s.add_metric([platform], self._engine_s[platform])
            for status in ("answered", "failed", "cancelled"):
                requests.add_metric([platform, status], self._requests[(platform, status)])
        for (platform, reason), n in sorted(self._rejected.items()):
            rejected.add_metric([platform, reason], n)
        yield from (requests, images, engine_s, rejected)
