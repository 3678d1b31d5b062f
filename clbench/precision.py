"""Precision from the machine: which autocast dtype ``train.amp: auto`` means here.

bf16 autocast pays only where the hardware multiplies bf16 matrices natively. On CPUs with
AVX512-BF16 or AMX it did: a 2048² bf16 matrix product ran 3.4x faster than fp32; on an
AVX2-only CPU it ran about 500x slower and a training step 23-32x slower, because oneDNN then
emulates bf16 (both in
``results/perf/amp_cpu.json``, from ``benchmarks/perf/amp_cpu.py``). So the choice is read
from the CPU's capabilities, never kept as a constant.

``torch.cpu.get_capabilities()`` (cpuinfo; a torch without it reads as no flags, i.e. fp32)
reports the flags. We do not use
``torch.ops.mkldnn._is_mkldnn_bf16_supported()``: it is true on any AVX512 CPU, where bf16
is emulated. Arm's BF16 extension also multiplies bf16 natively, but we have not measured
torch on it, so Arm CPUs stay fp32 until someone does.
"""

from __future__ import annotations

import platform
from collections.abc import Mapping
from typing import Any

import torch

from clbench.provenance import cpu_info

# x86 flags (torch.cpu.get_capabilities names) with native bf16 matrix instructions.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# Flags worth naming in a performance result: what decides the speed of fp32 and bf16.
REPORTED_FLAGS = ("avx2", "avx512_f", "avx512_bf16", "amx_tile", "amx_bf16", "avx512_fp16")


def cpu_capabilities() -> Mapping[str, Any]:
    """torch's view of this CPU's instruction sets (empty where torch cannot tell)."""
    get = getattr(torch.cpu, "get_capabilities", None)
    try:
        return get() if get is not None else {}
    except RuntimeError:  # cpuinfo could not initialise (exotic platforms)
        return {}


def cpu_has_native_bf16(caps: Mapping[str, Any] | None = None) -> bool:
    """True when the CPU multiplies bf16 matrices in hardware (AVX512-BF16 or AMX-BF16)."""
    caps = cpu_capabilities() if caps is None else caps
    return any(bool(caps.get(flag)) for flag in NATIVE_BF16_FLAGS)


def auto_amp_dtype(
    device: torch.device, caps: Mapping[str, Any] | None = None
) -> torch.dtype | None:
    """The autocast dtype for ``amp: auto``: bf16 on CUDA and on CPUs with native bf16
    matrix products, else None (fp32). ``caps`` overrides the detected CPU flags (tests)."""
    if device.type == "cuda":
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_native_bf16(caps):
        return torch.bfloat16
    return None


def cpu_description() -> dict[str, Any]:
    """Which CPU a measurement ran on: model name, the precision-relevant flags, core count
    and the dtype ``amp: auto`` picks here. Every perf result file carries this."""
    caps = cpu_capabilities()
    auto = auto_amp_dtype(torch.device("cpu"), caps)
    return {
        "model": cpu_info()["model"],
        "architecture": caps.get("architecture", platform.machine()),
        "flags": [f for f in REPORTED_FLAGS if caps.get(f)],
        "logical_cores": caps.get("num_logical_cores"),
        "native_bf16": cpu_has_native_bf16(caps),
        "amp_auto": "bf16" if auto is torch.bfloat16 else "fp32",
    }


def busy_cpus(interval: float = 0.5) -> float | None:
    """How many CPUs other work keeps busy now: the machine's non-idle share over
    ``interval`` seconds (Linux ``/proc/stat``) times its CPU count; None where unreadable.
    Measured, not the load average: that one lags by minutes after a job ends."""
    import os
    import time

    def ticks() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return sum(v), v[3] + v[4]  # all, idle + iowait

    try:
        (t0, i0), _ = ticks(), time.sleep(interval)
        t1, i1 = ticks()
    except (OSError, ValueError, IndexError):
        return None
    return (1 - (i1 - i0) / max(1, t1 - t0)) * (os.cpu_count() or 1)


def busy_cpus_note(threads: int | None = None, busy: float | None = None) -> str | None:
    """A one-line note when this run's threads plus the CPUs other work keeps busy
    (:func:`busy_cpus`) outnumber the CPUs this process may use, else None. Time-budgeted
    trainings print it: their budget then buys fewer steps, and OpenMP threads that
    outnumber cores spin at every barrier (a 2-thread video training beside a 1-thread job
    on 2 cores ran 17x slower per step than alone). ``busy`` overrides the measurement
    (tests)."""
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # no affinity on this platform
        cpus = os.cpu_count() or 1
    busy = busy_cpus() if busy is None else busy
    n = threads or torch.get_num_threads()
    if busy is None or busy + n <= cpus + 0.5:
        return None
    return (
        f"the machine is busy (other work keeps {busy:.1f} of {cpus} CPUs busy, plus this "
        f"run's {n} thread{'s' * (n != 1)}): a time budget will buy fewer steps; run "
        "time-budgeted trainings alone, or give each job --threads so that they add up to "
        "the CPUs"
    )


def warn_if_busy(who: str, threads: int | None) -> None:
    """Print :func:`busy_cpus_note` as a one-line warning on stderr (time-budgeted runs)."""
    import sys

    note = busy_cpus_note(threads)
    if note:
        print(f"warning: {who}: {note}", file=sys.stderr, flush=True)


def use_threads(who: str, threads: int | None, minutes: float | None = None) -> None:
    """A training's start: ``torch.set_num_threads(threads)`` when given, then, for a time
    budget (``minutes``), :func:`warn_if_busy`."""
    if threads:
        torch.set_num_threads(threads)
    if minutes is not None:
        warn_if_busy(who, threads)
