"""/health shows the local engine's CPU tier and C kernels (from EngineInfo.details: the HTTP
adapter never imports engine/), and the real engine puts the forced tier there."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from bot.engine_port import EngineInfo
from engine.cpu.kernels.bf16_kernel import load_kernel
from tests.http_helpers import CheckingEngine, running
from tests.tier_helpers import forced


class TieredEngine(CheckingEngine):
    @property
    def info(self) -> EngineInfo:
        details = {"cpu_tier": "avx2", "kernels": "bf16_matvec, decode_ops"}
        return EngineInfo(name="scripted", model="script", details=details)


async def test_health_names_the_cpu_tier_and_kernels(tmp_path: Path) -> None:
    async with running(tmp_path, engine=TieredEngine()) as server, httpx.AsyncClient() as http:
        body = (await http.get(f"{server.url}/health")).json()
    assert body["cpu_tier"] == "avx2" and body["kernels"] == "bf16_matvec, decode_ops"


def test_the_engine_reports_the_forced_tier(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.qwen.engine import QwenVLEngine

    with forced(monkeypatch, "avx2", load_kernel):
        details = QwenVLEngine("Qwen/Qwen3-VL-2B-Instruct").info.details  # nothing loaded yet
        assert details["cpu_tier"] == "avx2"
        if load_kernel() is not None:  # resolving dtype=auto built the bf16 kernel for avx2
            assert "bf16_matvec" in details["kernels"]
