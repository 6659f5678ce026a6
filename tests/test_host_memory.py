"""The CPU rank's heap policy: freed blocks stay with the process, so a step's allocations fault no pages."""
import platform
import subprocess
import sys

import pytest

PATTERN = r"""
import resource, sys, torch
from meshtron.train.host_memory import retain_freed_memory
applied = sys.argv[1] == "retain" and retain_freed_memory() and retain_freed_memory()    # idempotent
def step():                         # a training step's shapes: s² probabilities, masks, activations, freed
    live = []
    for _ in range(8):
        live += [torch.ones(4 << 20), torch.ones(1 << 20), torch.ones(1 << 18)]
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    step()
print(int(applied), (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
"""


def _faults(mode: str, **env):
    import os
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}, timeout=120)
    applied, faults = out.stdout.strip().splitlines()[-1].split()
    return applied == "1", float(faults)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the policy is glibc's mallopt")
def test_retained_heap_reuses_pages_that_glibc_would_return():
    (_, default), (applied, retained) = _faults("default"), _faults("retain")
    assert default > 1000, default            # glibc's default: fresh zeroed pages for the large blocks each step
    assert applied and retained < 0.01 * default, (retained, default)
    applied, opted_out = _faults("retain", MESHTRON_HOST_MALLOC="default")
    assert not applied and opted_out > 1000, opted_out
