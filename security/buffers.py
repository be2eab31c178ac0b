"""Fresh buffers that sealing and opening fill in place, so that no result is a copy of another.

Flower's ``Array.data`` must be ``bytes``, and ``bytes`` cannot be filled from Python: the only
way to hand Flower an opened array without copying it is CPython's own, a bytes object made by
``PyBytes_FromStringAndSize(NULL, size)`` and written through ``PyBytes_AsString`` before it is
shared (allowed by the C API: "The data must not be modified in any way, unless the object was
just created using PyBytes_FromStringAndSize(NULL, size)").

Fresh memory costs a page fault per 4 KiB page on first write, as much as the cipher itself in a
virtual machine; numpy asks Linux for transparent huge pages on its allocations of 4 MiB and up
(one fault per 2 MiB), and :func:`fresh_bytes` does the same.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import numpy as np

_new_bytes = ctypes.pythonapi.PyBytes_FromStringAndSize
_new_bytes.argtypes = (ctypes.c_void_p, ctypes.c_ssize_t)
_new_bytes.restype = ctypes.py_object
_bytes_buffer = ctypes.pythonapi.PyBytes_AsString
_bytes_buffer.argtypes = (ctypes.py_object,)
_bytes_buffer.restype = ctypes.c_void_p
_HUGE_PAGE = 2 << 20
_HUGE_PAGES_FROM = 4 << 20  # numpy's threshold (hugepage madvise in its default allocator)
_madvise = ctypes.CDLL(None).madvise if sys.platform == "linux" else None
if _madvise is not None:
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)


def fresh_bytes(size: int) -> tuple[bytes, memoryview]:
    """A new, unfilled ``bytes`` of ``size`` bytes and a writable view of its buffer.

    Fill every byte through the view, then drop it, before the bytes object is used or shared;
    one that is not filled (an error on the way) must be dropped too: it holds stale memory.
    """
    data = _new_bytes(None, size)
    if size == 0:  # the shared empty bytes: nothing to write
        return data, memoryview(bytearray())
    address = _bytes_buffer(data)
    if size >= _HUGE_PAGES_FROM:
        _advise_huge_pages(address, size)
    return data, memoryview((ctypes.c_char * size).from_address(address)).cast("B")


def fresh_array(size: int) -> tuple[memoryview, memoryview]:
    """A new, unfilled, writable buffer of ``size`` bytes (numpy memory), twice: result and view."""
    view = np.empty(size, dtype=np.uint8).data
    return view, view


def _advise_huge_pages(address: int, size: int) -> None:
    """Hint Linux to back the 2 MiB-aligned inside of ``[address, address + size)`` with huge pages
    (``MADV_HUGEPAGE``; a hint: the result is ignored, and elsewhere it is not given at all)."""
    start = -(-address // _HUGE_PAGE) * _HUGE_PAGE
    end = (address + size) // _HUGE_PAGE * _HUGE_PAGE
    if _madvise is not None and end > start:
        _madvise(start, end - start, mmap.MADV_HUGEPAGE)
