"""What this machine computes with: the CPU's name and features, whether a device does bf16 natively, and
autocast by precision name. Features are read from the CPU, never assumed (the same project runs on
AVX2-only EPYCs, AVX-512 BF16 EPYCs and AMX Xeons, and bf16 is ~8× slower than fp32 on the first)."""

from __future__ import annotations

import functools
import platform
from contextlib import nullcontext
from pathlib import Path

import torch

# CPU flags (Linux /proc/cpuinfo) of instructions that compute bf16 matrix products natively
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} elsewhere)."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    fields: dict[str, str] = {}
    for line in path.read_text().split("\n\n")[0].splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    return fields


def cpu_name() -> str:
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
    return set(_cpuinfo().get("flags", "").split())


def native_bf16(device: torch.device) -> bool:
    """CUDA (Ampere and later), or a CPU with AMX or AVX-512 BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and any(flag in cpu_flags() for flag in BF16_CPU_FLAGS)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`auto` -> bf16 where the device computes it natively, else fp32; fp32 and bf16 as they are."""
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def autocast(precision: str, device: torch.device):
    """bf16 autocast (CPU or GPU) for `bf16`, plain fp32 otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
