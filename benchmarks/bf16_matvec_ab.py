"""A/B of builds of the bf16 matrix-vector kernel (engine/cpu/kernels/bf16_matvec.c) against a
plain float32 sum over the same bytes: what a decode step's weight reading could be.

Each variant is the kernel's one source built with its own `-D` macros (WEIGHT_ROWS,
PREFETCH_ROWS, PREFETCH_LOCALITY, SINGLE_SCHEDULE) for the process's CPU tier (set
`VLBOT_CPU=avx2 ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` for the forced AVX2 tier). The
weights are the 28 layers' decode matrices as a decode step reads them (q+k+v joined, o, gate+up
joined, down: 112 calls, 2.82 GB) on 2 MiB pages, random values. One pass = one activation row
through all of them; the variants and the sum take turns within every round, so a machine loaded
by other work slows them alike. Printed: each one's median and best pass, its GB/s, and in how
many rounds each variant beat the first one.

    .venv/bin/python -m benchmarks.bf16_matvec_ab --rounds 40 \
        base= pf4=-DPREFETCH_ROWS=4 'rows8=-DWEIGHT_ROWS=8 -DPREFETCH_ROWS=16' old=@/tmp/old.c

A manual tool: never part of the test suite.
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from engine.cpu.hugepages import HugePageArena
from engine.cpu.native import COMMON_FLAGS, KERNELS, active_tier

LAYERS = 28
HIDDEN, INTERMEDIATE, Q_ROWS, KV_ROWS = 2048, 6144, 2048, 1024
# (rows, columns) of one layer's decode calls: qkv joined, o, gate+up joined, down
LAYER_SHAPES = (
    (Q_ROWS + 2 * KV_ROWS, HIDDEN),
    (HIDDEN, Q_ROWS),
    (2 * INTERMEDIATE, HIDDEN),
    (HIDDEN, INTERMEDIATE),
)


def build(label: str, options: list[str], directory: Path) -> ctypes.CDLL:
    """The kernel built with `options` (-D macros, -m flags); an option `@PATH` builds the source
    at PATH instead (another version of the file, e.g. `git show REV:engine/...c > PATH`)."""
    sources = [o[1:] for o in options if o.startswith("@")] or [str(KERNELS / "bf16_matvec.c")]
    defines = [o for o in options if not o.startswith("@")]
    built = directory / f"bf16_matvec_{label}.so"
    flags = [*COMMON_FLAGS, *active_tier().compile_flags, "-I", str(KERNELS), *defines]
    subprocess.run(["gcc", *flags, "-o", str(built), sources[0]], check=True)
    return ctypes.CDLL(str(built))


def weights() -> list[torch.Tensor]:
    nbytes = LAYERS * sum(r * c * 2 + 4096 for r, c in LAYER_SHAPES)
    arena = HugePageArena(nbytes)
    out = []
    for _ in range(LAYERS):
        for rows, columns in LAYER_SHAPES:
            tensor = arena.empty((rows, columns), torch.bfloat16)
            tensor.normal_(0.0, 0.02)
            out.append(tensor)
    return out


class KernelPass:
    """`rows` activation rows (one decode step's conversations) through every matrix with one
    build of the kernel."""

    def __init__(self, library: ctypes.CDLL, matrices: list[torch.Tensor], threads: int, rows: int) -> None:
        self.bf16 = active_tier().bf16_arithmetic
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        self.function = library.vlbot_bf16_matvec if self.bf16 else library.vlbot_bf16_matvec_f32
        self.function.restype = ctypes.c_int
        self.calls = []
        generator = torch.Generator().manual_seed(0)  # the same activations for every variant
        for matrix in matrices:
            outputs, columns = matrix.shape
            x = torch.randn(rows, columns, generator=generator).to(dtype)
            y = torch.empty(rows, outputs, dtype=dtype)
            args = (
                ctypes.c_void_p(x.data_ptr()),
                ctypes.c_int64(rows),
                ctypes.c_int64(columns),
                ctypes.c_int64(outputs),
                ctypes.c_void_p(matrix.data_ptr()),
                ctypes.c_void_p(None),
                ctypes.c_void_p(y.data_ptr()),
                ctypes.c_int(threads),
            )
            self.calls.append((x, y, args))

    def __call__(self) -> None:
        for _, _, args in self.calls:
            self.function(*args)

    def outputs(self) -> list[torch.Tensor]:
        return [y.float() for _, y, _ in self.calls]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "variants", nargs="+", help="label='-DMACRO=value -DOTHER=value' (the first: the reference)"
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1, help="activation rows per product (a batch)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    matrices = weights()
    nbytes = sum(m.numel() * 2 for m in matrices)
    as_float = [m.view(-1).view(torch.float32) for m in matrices]
    kernels: dict[str, KernelPass] = {}
    with tempfile.TemporaryDirectory() as directory:
        for spec in args.variants:
            label, _, defines = spec.partition("=")
            library = build(label, defines.split(), Path(directory))
            kernels[label] = KernelPass(library, matrices, args.threads, args.rows)

    def plain_sum() -> None:
        for tensor in as_float:
            tensor.sum()

    runs: dict[str, Callable[[], None]] = {**kernels, "sum": plain_sum}
    labels = list(runs)
    for run in runs.values():
        run()
    reference = kernels[labels[0]].outputs()
    for label, kernel in kernels.items():
        same = all(torch.equal(a, b) for a, b in zip(reference, kernel.outputs(), strict=True))
        print(f"{label}: outputs {'identical to' if same else 'differ from'} {labels[0]}'s")
    times: dict[str, list[float]] = {label: [] for label in labels}
    for round_index in range(args.rounds):
        order = labels if round_index % 2 == 0 else labels[::-1]
        for label in order:
            started = time.perf_counter()
            runs[label]()
            times[label].append(time.perf_counter() - started)
    tier = active_tier().name
    print(
        f"tier {tier}, {args.threads} threads, {args.rows} row(s), {args.rounds} rounds,"
        f" {nbytes / 1e9:.2f} GB per pass"
    )
    base = times[labels[0]]
    for label in labels:
        series = times[label]
        median = statistics.median(series)
        wins = sum(t < b for t, b in zip(series, base, strict=True))
        print(
            f"{label:>12}: median {median * 1e3:7.1f} ms ({nbytes / median / 1e9:5.1f} GB/s), "
            f"best {min(series) * 1e3:7.1f} ms, faster than {labels[0]} in {wins}/{args.rounds}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
