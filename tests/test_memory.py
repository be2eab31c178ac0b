"""Freed update-sized buffers come back warm in a party's process (fedvault.memory)."""

import platform
import subprocess
import sys

import pytest
from waits import seconds

_SECOND_FILL_FAULTS = """
import resource, sys
import numpy as np
from fedvault.memory import keep_freed_buffers
if sys.argv[1] == "tuned":
    assert keep_freed_buffers()
size = 48 << 20  # an update's array: above glibc's default (and dynamic) mmap threshold
np.ones(size, dtype=np.uint8)  # allocated, touched, freed
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
buffer = np.empty(size, dtype=np.uint8)
buffer[:] = 1
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _second_fill_faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", _SECOND_FILL_FAULTS, mode], capture_output=True, text=True, timeout=seconds(60)
    )
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the allocator setting is glibc's")
def test_a_freed_buffer_is_reused_without_page_faults():
    huge_pages = (48 << 20) // (2 << 20)  # the fewest faults fresh memory can cost (numpy asks for huge pages)
    assert _second_fill_faults("default") >= huge_pages  # the system default hands it back and faults again
    assert _second_fill_faults("tuned") < huge_pages // 4  # kept: the second buffer reuses warm memory
