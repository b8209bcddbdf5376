"""engine.qwen: the transformers engine — Qwen-VL (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) on CPU.

- engine.py — `QwenVLEngine`, the Engine port (bot/engine_port.py) over a transformers model;
- loading.py — the model source (folder or hub id), dtype, threads and CPU features, the
  processor and the pixel budget's sizes, load failures as one-sentence fixes;
- prompt.py — history + new message as chat-template input, images decoded by engine.intake;
- scheduler.py — the one compute thread: each request prefilled on its own (reusing its
  conversation's cache), then decoded in a batch with the others, one step at a time;
- batching.py — the decode batch's rows, padding and masks;
- kvcache.py — conversations' KV caches kept between turns, and their rotary positions;
- kvbuffer.py — KV-cache layers that append in place;
- streaming.py — tokens to text pieces for the async side, and the abort hooks.

May import: engine.cpu (what goes into the model comes from engine.cpu.swap), engine.intake,
bot.models and bot.engine_port; not engine.ocr, engine.remote or engine.auto.
"""
