"""Where tensors run and in which precision: one place for the registry, training and benches.

bf16 autocast pays on a CPU only where the hardware has bf16 arithmetic (AVX-512 BF16 or
AMX); elsewhere it emulates and is slower than fp32, so it is detected, not assumed.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools


def resolve_device(device: str = 'auto') -> str:
    """Map 'auto' to 'cuda' where a GPU is usable, else 'cpu'; validate others."""
    if device not in ('auto', 'cpu', 'cuda') and not device.startswith('cuda:'):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    if device == 'cpu':
        return 'cpu'
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if device == 'auto':
        return 'cuda' if has_cuda else 'cpu'
    if not has_cuda:
        raise ValueError(f'device {device!r} requested but CUDA is not available')
    return device


@functools.lru_cache(maxsize=1)
def cpu_has_bf16() -> bool:
    """True where the CPU computes bf16 natively (AVX-512 BF16 or AMX-BF16)."""
    try:
        with open('/proc/cpuinfo', encoding='ascii', errors='replace') as f:
            for line in f:
                if line.startswith('flags'):
                    flags = set(line.split(':', 1)[1].split())
                    return bool({'avx512_bf16', 'amx_bf16'} & flags)
    except OSError:
        pass
    return False


def autocast_dtype(device_type: str, enabled: bool = True):
    """The autocast dtype for a device type, or None where mixed precision does not pay."""
    import torch
    if not enabled:
        return None
    if device_type == 'cuda':
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device_type == 'cpu' and cpu_has_bf16():
        return torch.bfloat16
    return None


PRECISIONS = ('auto', 'fp32', 'bf16')
"""A network matcher's ``precision`` option: the detected mixed precision, or forced."""


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')


def inference_dtype(precision: str, device: str):
    """The autocast dtype that ``precision`` asks for on ``device`` (None: plain fp32)."""
    import torch
    check_precision(precision)
    if precision == 'fp32':
        return None
    if precision == 'bf16':
        return torch.bfloat16
    return autocast_dtype('cuda' if str(device).startswith('cuda') else 'cpu')


def autocast(device: str, dtype):
    """``torch.autocast`` on ``device``'s type with ``dtype``; a no-op context for None."""
    import torch
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast('cuda' if str(device).startswith('cuda') else 'cpu', dtype=dtype)


DEFAULT_THREADS = 1
"""CPU threads for torch and OpenCV when nothing is said. One thread: on a small, busy
robot computer a matcher that spreads over every core fights the other processes for them
(measured on 2 cores: README, "CPU threads")."""


def set_threads(threads: int) -> int:
    """Use ``threads`` CPU threads in torch and OpenCV (0: leave the libraries' defaults).

    Returns the count torch now uses. Both libraries matter: DIS and the image conversions
    run in OpenCV's pool, the networks in torch's.
    """
    threads = int(threads)
    if threads < 0:
        raise ValueError(f'threads must be >= 0 (0: library defaults), got {threads}')
    import cv2
    import torch
    if threads > 0:
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
    return torch.get_num_threads()


@contextlib.contextmanager
def limit_threads(threads: int, opencv: bool = True):
    """torch (and OpenCV, unless ``opencv`` is False) on at most ``threads`` threads inside
    the block, the previous counts restored after it. For work split by hand over the cores
    (a network here, DIS in a second thread there): each side on all of them would
    oversubscribe both."""
    import cv2
    import torch
    before = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(min(before[0], threads))
    if opencv:
        cv2.setNumThreads(min(before[1], threads))
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        cv2.setNumThreads(before[1])


RETAINED_MMAP_THRESHOLD = 32 * 2 ** 20
"""Allocations below this come from the heap (glibc's largest allowed value): a frame's
flows, maps and feature maps (1-4 MB at 640x480) then reuse freed memory."""
RETAINED_TRIM_THRESHOLD = 256 * 2 ** 20
"""Free memory kept at the top of the heap before any is given back to the system."""
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3   # glibc's mallopt parameter numbers


def retain_freed_memory(enabled: bool = True) -> bool:
    """Keep the memory a frame frees for the next frame (glibc; elsewhere nothing changes).

    Why: by default glibc hands arrays of a few MB fresh mappings from the system and returns
    them when freed, so every frame's dozens of flows, maps and feature maps are page-faulted
    in anew. Served from a heap that is not trimmed, the same pair at 640x480 on one thread
    took 3-8 % less time (``dis`` 129.6 -> 119.8 ms, ``neuflow-fast`` 363.0 -> 346.5; README,
    "Pre-alignment beyond its matches, memory kept between frames"). The cost: the process
    keeps its peak memory. The ROS 2 real-time guidelines make the same call for the same
    reason (page faults in the loop).
    Returns whether both settings took effect.
    """
    if not enabled:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt   # the C library this process already runs on
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # The mmap threshold first: setting either one ends glibc's own adjustment of both, and
    # a trim threshold alone leaves every large array mapped afresh (30 % slower here).
    return (mallopt(_M_MMAP_THRESHOLD, RETAINED_MMAP_THRESHOLD) == 1
            and mallopt(_M_TRIM_THRESHOLD, RETAINED_TRIM_THRESHOLD) == 1)
