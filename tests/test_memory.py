"""process/memory.py: the heap is trimmed when the resident size grew, and only then; on glibc,
freed pages held between live allocations go back to the system."""

from __future__ import annotations

import sys
import threading

import pytest

from camserve_server.process.memory import GROWTH_BYTES, Trimmer, resident_bytes

from conftest import wait_for


def test_trims_while_above_the_least_and_ever_less_often_when_nothing_comes_back():
    mib = 1 << 20
    sizes = ([100 * mib] * 3 + [100 * mib + GROWTH_BYTES // 2] * 3  # steady; a small growth
             + [300 * mib, 150 * mib]  # a burst, then what the first trim left
             + [150 * mib] * 40)  # live: later trims give nothing back
    trims = []
    read_all = threading.Event()

    def size():
        if len(sizes) == 1:
            read_all.set()
            return sizes[0]
        return sizes.pop(0)

    trimmer = Trimmer(trim=lambda pad: trims.append(pad) or 1, size=size, every=0.001)
    try:
        wait_for(read_all.is_set, 10, "every size read")
    finally:
        trimmer.close()
    # Reads 1-6 under the bar; a trim at read 7 gives 150 MiB back (its after-read is 8), so
    # the next comes at read 9; it gives nothing, so 1, 3, 7, 15 checks are let pass before
    # the next ones: trims at reads 7, 9, 12, 17, 26 and 43 of the 48.
    assert trims == [0] * 6


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim, /proc")
def test_freed_pages_between_live_allocations_go_back():
    """Many 64 KiB blocks (below malloc's mmap threshold, so on the heap), every other one
    freed: the freed half stays resident until the heap is trimmed."""
    trimmer = Trimmer(every=0.05)
    try:
        blocks = [bytearray(b"x" * (64 << 10)) for _ in range(4000)]  # 256 MiB, touched
        del blocks[::2]
        held = resident_bytes()
        wait_for(lambda: resident_bytes() < held - (64 << 20), 30, "the freed half given back")
        del blocks
    finally:
        trimmer.close()
