"""The remote engine (`engine=openai`): OpenAI-compatible servers (vLLM, llama.cpp's server,
Ollama, another vlbot) answer instead of a local model.

- engine/remote/server.py: `OpenAIRemoteEngine`, one server: requests sent, answers streamed back;
- engine/remote/pool.py: `RemotePool`, several servers behind one engine: health-checked,
  least-busy routing, failover before the first token.
"""

from __future__ import annotations

from engine.remote.pool import RemotePool
from engine.remote.server import OpenAIRemoteEngine, RemoteEngineError, public_url

__all__ = ["OpenAIRemoteEngine", "RemoteEngineError", "RemotePool", "public_url"]
