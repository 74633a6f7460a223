"""mpnet.heap: the master gives its free heap pages back before forking a worker."""

from __future__ import annotations

import platform

import pytest

from mpnet.heap import trim_heap


def test_trim_heap_runs_where_the_c_library_has_it():
    freed = [bytearray(256 * 1024) for _ in range(8)]  # malloc'd, then free heap
    del freed
    done = trim_heap()
    if platform.libc_ver()[0] != "glibc":
        pytest.skip(f"malloc_trim is glibc's; this C library: {platform.libc_ver()[0] or '?'}")
    assert done is True
    assert trim_heap() is True  # the looked-up function is reused
