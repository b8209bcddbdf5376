"""engine.allocator: with the raised malloc thresholds, large buffers allocated and freed over and
over (as every layer of a first turn does) are reused instead of faulted in afresh each time."""

from __future__ import annotations

import subprocess
import sys

import pytest

from engine.allocator import keep_large_buffers

PROGRAM = """
import resource, sys, threading
import torch
if sys.argv[1] == "tuned":
    from engine.allocator import keep_large_buffers
    assert keep_large_buffers()
faults = []
def work():  # like a vision layer at 1080p on the engine's thread: two 33 MB activations
    for _ in range(12):
        before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
        a = torch.ones(33 * 1024 * 1024 // 4)  # every page touched
        b = torch.ones(33 * 1024 * 1024 // 4)
        del a, b
        faults.append(resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before)
thread = threading.Thread(target=work)
thread.start()
thread.join()
print(sum(faults[2:]))
"""


def faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, timeout=120, check=True
    )
    return int(done.stdout.strip())


def test_large_buffers_are_reused_instead_of_faulted_in() -> None:
    if not keep_large_buffers():
        pytest.skip("the C library is not glibc")
    pages = 10 * 2 * 33 * 1024 * 1024 // 4096  # the ten rounds after the first two
    default = faults("default")
    assert default > pages // 4  # faulted in afresh every round
    assert faults("tuned") < default // 2
