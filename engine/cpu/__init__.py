"""engine.cpu: making the transformers model fast on a CPU, without changing what it computes.

- swap.py — the one place where this package goes into a loaded model, and the one list of what
  is swapped (read it first);
- tiers.py — the CPU tier (avx2, avx512, avx512_bf16, amx, aarch64), detected once from
  /proc/cpuinfo; `VLBOT_CPU` forces a lower one;
- native.py — builds the C kernels (kernels/*.c) with the system compiler on first use into
  ~/.cache/vlbot/kernels, with the tier's flags, for the kernels the tier can run; loads them
  with ctypes;
- half_weights.py — where the tier has no bf16 arithmetic, a bf16 model computes in float32
  with its language model's linear weights kept bf16;
- summary.py — the tier and the kernels in use, for doctor, /health and the benchmark;
- kernels/ — each C kernel next to its Python wrapper (the torch module it stands in for);
- decode_step.py — a decode step of the language model written out in fewer operators;
- patch_embed.py — the vision patch embedding as one matrix product;
- quant.py — opt-in int8/int4 weights for the language model's linear layers;
- hugepages.py — the language model's weights moved onto 2 MiB pages in idle time.

Every piece falls back to torch's own operators where its kernel does not build here (another
CPU, no compiler, `VLBOT_NATIVE_KERNELS=off`).

May import: torch, transformers and engine.cpu itself; nothing else of engine/ and nothing of
bot/ or adapters/ (engine.qwen uses this package, not the other way round).
"""
