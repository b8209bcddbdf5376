"""docs/compose.yml cannot be run here (no Docker engine): it is checked as data instead. Two bot
replicas share the Postgres service's database, wait for it to be healthy, receive every
platform through the proxy in the modes replicas need (Telegram webhook, Slack HTTP), and the
proxy's upstreams name both replicas on the ports the replicas listen on."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).parent.parent / "docs" / "compose.yml"


def load() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


def test_two_replicas_share_the_postgres_service() -> None:
    compose = load()
    services = compose["services"]
    bots = {name: s for name, s in services.items() if name.startswith("bot")}
    assert len(bots) == 2
    db = services["db"]["environment"]
    for bot in bots.values():
        env = bot["environment"]
        url = re.fullmatch(r"postgresql://(\w+):(.+)@db:5432/(\w+)", env["VLBOT_DATABASE_URL"])
        assert url is not None
        assert (url[1], url[2], url[3]) == (db["POSTGRES_USER"], db["POSTGRES_PASSWORD"], db["POSTGRES_DB"])
        assert bot["depends_on"]["db"]["condition"] == "service_healthy"
        assert env["VLBOT_TELEGRAM__MODE"] == "webhook"  # long polling has a single consumer
        assert env["VLBOT_SLACK__MODE"] == "http"
    assert "healthcheck" in services["db"]


def test_the_proxy_spreads_each_platform_over_both_replicas() -> None:
    compose = load()
    services = compose["services"]
    bots = sorted(name for name in services if name.startswith("bot"))
    env = services[bots[0]]["environment"]
    nginx = compose["configs"]["nginx"]["content"]
    upstreams = dict(re.findall(r"upstream (\w+)\s*\{([^}]*)\}", nginx))
    ports = {
        "vlbot_http": env["VLBOT_HTTP__PORT"],
        "vlbot_telegram": env["VLBOT_TELEGRAM__WEBHOOK_PORT"],
        "vlbot_slack": env["VLBOT_SLACK__PORT"],
    }
    for upstream, port in ports.items():
        servers = re.findall(r"server (\w+):(\d+)", upstreams[upstream])
        assert sorted(servers) == [(bot, port) for bot in bots], upstream
    webhook_path = env["VLBOT_TELEGRAM__WEBHOOK_URL"].split("}", 1)[1]
    assert f"location {webhook_path} {{ proxy_pass http://vlbot_telegram; }}" in nginx
    assert "location /slack/ { proxy_pass http://vlbot_slack; }" in nginx
    assert services["proxy"]["configs"][0]["target"] == "/etc/nginx/conf.d/default.conf"
    assert "$$host" in nginx  # compose would otherwise substitute nginx's variables
