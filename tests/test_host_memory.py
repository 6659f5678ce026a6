"""The CPU rank's heap policy: large blocks come from the heap and stay with the process when freed, so a
training step's allocations reuse the last step's pages."""
import os
import platform
import subprocess
import sys

import pytest

PATTERN = r"""
import ctypes, resource, sys, torch
from meshtron.train.host_memory import retain_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2
applied = sys.argv[1] == "retain" and retain_freed_memory() and retain_freed_memory()    # idempotent
t = torch.ones(4 << 20)                                 # 16 MiB: glibc's default maps it on its own
mapped = libc.mallinfo2().hblkhd
del t
kept = libc.mallinfo2().fordblks                        # free bytes the heap still holds
def step():                         # a training step's shapes: s² probabilities, masks, activations, freed
    live = []
    for _ in range(8):
        live += [torch.ones(4 << 20), torch.ones(1 << 20), torch.ones(1 << 18)]
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(int(applied), mapped, kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _run(mode: str, **env):
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=120)
    applied, mapped, kept, faults = out.stdout.split()[-4:]
    return applied == "1", int(mapped), int(kept), float(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")
def test_retained_heap_serves_large_blocks_and_keeps_them():
    applied, mapped, kept, faults = _run("default")
    assert not applied and mapped >= 16 << 20               # glibc's default: a block of its own, unmapped on free
    applied, mapped, kept, faults = _run("retain")
    assert applied and mapped < 16 << 20 and kept >= 16 << 20   # from the heap, and kept there when freed
    assert faults < 100, faults                             # steady steps fault no fresh pages in
    applied, mapped, _, _ = _run("retain", MESHTRON_HOST_MALLOC="default")
    assert not applied and mapped >= 16 << 20               # the opt-out
