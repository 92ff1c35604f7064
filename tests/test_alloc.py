"""bfd.tune_allocator: freed tensors stay in the process, so a loop of temporary tensors
stops paying page faults (glibc only)."""

import subprocess
import sys

import pytest

CODE = """
import resource, sys, torch
import bayesfilter_diff as bfd
if sys.argv[1] == "1":
    assert bfd.tune_allocator()
x = torch.randn(16, 131072)  # 8 MiB: above glibc's default mmap threshold
y = x * 2  # warm up
r0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(200):
    y = (x * 2 + 1) * x
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_tuned_allocator_stops_the_page_faults_of_temporaries():
    def faults(tuned: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", CODE, tuned], capture_output=True, text=True, check=True
        )
        return int(out.stdout.strip().splitlines()[-1])

    default, tuned = faults("0"), faults("1")
    # default: the freed temporaries go back to the kernel and come back as fresh pages
    # (measured 128k faults); tuned: the heap's first pages only (measured 8k-16k)
    assert tuned < default / 3, (tuned, default)
