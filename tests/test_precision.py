"""Precision from the machine: ``amp: auto`` reads the CPU's bf16 capability."""

from __future__ import annotations

import pytest
import torch

from clbench.precision import auto_amp_dtype, cpu_description, cpu_has_native_bf16

CPU = torch.device("cpu")


@pytest.mark.parametrize(
    ("caps", "expected"),
    [
        ({"avx2": True, "avx512_f": True}, None),  # AVX512 alone: oneDNN emulates bf16
        ({"avx2": True}, None),
        ({"avx512_bf16": True}, torch.bfloat16),
        ({"amx_bf16": True, "amx_tile": True}, torch.bfloat16),
        ({"architecture": "arm64", "bf16": True}, None),  # not measured on Arm: fp32
        ({}, None),
    ],
)
def test_cpu_dtype_follows_native_bf16_flags(caps, expected):
    assert auto_amp_dtype(CPU, caps) is expected


def test_cuda_is_always_bf16():
    assert auto_amp_dtype(torch.device("cuda"), {}) is torch.bfloat16


def test_cpu_description_names_the_cpu_and_agrees_with_auto():
    d = cpu_description()
    assert d["model"] and isinstance(d["flags"], list)
    assert d["native_bf16"] == cpu_has_native_bf16()
    assert d["amp_auto"] == ("bf16" if auto_amp_dtype(CPU) is torch.bfloat16 else "fp32")


def test_busy_cpus_note_names_the_load_and_threads():
    import os

    from clbench.precision import busy_cpus, busy_cpus_note

    cpus = len(os.sched_getaffinity(0))
    assert busy_cpus_note(threads=1, busy=0.0) is None
    note = busy_cpus_note(threads=cpus, busy=float(cpus))
    assert note is not None and f"keeps {float(cpus):.1f} of {cpus} CPUs busy" in note
    assert f"this run's {cpus} thread" in note and "\n" not in note
    measured = busy_cpus(0.05)
    assert measured is None or 0.0 <= measured <= (os.cpu_count() or 1) + 1e-6
