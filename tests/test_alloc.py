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
for _ in range(20):  # warm up: the heap's first pages, glibc's dynamic thresholds settled
    y = (x * 2 + 1) * x
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
    # after the warm-up, default: the freed temporaries go back to the kernel and come back
    # as fresh pages (measured 61k-509k faults over the 200 iterations, 2 temporaries of
    # 2048 pages each: up to 819k); tuned: a few temporaries' at most (measured 0 in 16 of
    # 18 probe runs with 1 or 2 threads, 4096 and 8192 in the other two).
    # Counting from the first iteration instead (before 2026-12-04) mixed in the heap's
    # first pages and glibc's adapting thresholds: tuned 4k-18k, default 32k-513k, so the
    # ratio test failed once under load
    assert tuned < 16 * 2048, (tuned, default)  # under 4% of fresh pages for every temporary
    if default < 16 * 2048:
        # glibc's dynamic mmap threshold can also keep the temporaries in the heap (a CI
        # run on 2026-12-07 measured 0 faults for both): then there is nothing here for
        # the tuning to stop, and the comparison says nothing either way
        pytest.skip(f"the default allocator did not fault here ({default} faults)")
    assert tuned < default / 3, (tuned, default)
