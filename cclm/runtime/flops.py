"""Peak FLOP/s of the device, the denominator of MFU (model FLOPs utilisation)."""

from __future__ import annotations

import re

import torch

# Dense bf16 tensor-core peak FLOP/s per device (no sparsity; NVIDIA's datasheets halve their "with sparsity"
# figures), by the words of torch.cuda.get_device_name(). A key matches whole words of the name, and the key
# with the most words wins: "H100 PCIe" before "H100", so that the PCIe and NVL cards do not get the SXM peak,
# and "L40" never matches an "L40S" nor "A10" an "A100" (whole words only).
PEAK_BF16_FLOPS = {
    "GH200": 989e12,
    "H200 NVL": 835e12,
    "H200": 989e12,  # H200 SXM
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,  # per GPU
    "H100": 989e12,  # H100 SXM ("NVIDIA H100 80GB HBM3")
    "A100": 312e12,  # SXM and PCIe alike
    "L40S": 362e12,
    "L40": 181e12,
    "L4": 121e12,
    "A10": 125e12,  # not the A10G, whose peak is lower: unknown names give no MFU
    "V100": 125e12,  # fp16: V100 has no bf16 tensor cores
    "4090": 165e12,  # GeForce RTX 4090, fp32 accumulate
}


def _words(name: str) -> list[str]:
    return [w for w in re.split(r"[\s\-_/]+", name.lower()) if w]


def peak_for_name(name: str) -> float | None:
    """The dense bf16 peak of a device named ``name`` (as CUDA names it), or None when it is not known."""
    words = _words(name)
    best: tuple[int, float] | None = None
    for key, value in PEAK_BF16_FLOPS.items():
        wanted = _words(key)
        found = any(words[i : i + len(wanted)] == wanted for i in range(len(words) - len(wanted) + 1))
        if found and (best is None or len(wanted) > best[0]):
            best = (len(wanted), value)
    return best[1] if best else None


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return peak_for_name(torch.cuda.get_device_name(device))
