"""A step time projected from what one device computes, reads and sends (`sr_jax.bench.compiled`), on named
accelerators, from their published specifications (docs/PERFORMANCE.md cites them).

    step = max(FLOPs / peak, bytes accessed / HBM bandwidth) + sum over collectives (latency + wire bytes / link)

Compute and communication are not overlapped (an upper bound on the step: XLA overlaps some), the HBM term is
XLA's count of bytes accessed (on the machine it was compiled for), and a collective whose group spans more than
one fast island (8 NVLink-joined GPUs of a DGX/HGX H100; a TPU pod's ICI) runs at the slow link's bandwidth.
Bandwidths are per direction per device (the published figures are bidirectional aggregates: halved).
"""

from __future__ import annotations

import dataclasses

from sr_jax.bench.compiled import Collective


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str
    peak_flops: float  # FLOP/s of the precision an f32 step's matmuls run at (TF32 on H100, bf16 passes on TPU)
    hbm: float  # bytes/s
    link: float  # bytes/s per device, per direction, inside an island
    island: int  # devices joined by the fast link
    slow_link: float  # bytes/s per device between islands
    latency: float  # seconds per collective (its fixed cost), inside an island
    slow_latency: float


ACCELERATORS = {
    # NVIDIA H100 SXM5 datasheet: TF32 tensor 989 TFLOP/s with sparsity (494.7 dense), HBM3 3.35 TB/s, NVLink 4
    # 900 GB/s (bidirectional); DGX H100: 8 GPUs an NVLink island, one ConnectX-7 400 Gb/s NIC per GPU.
    "h100": Accelerator("H100 SXM", 494.7e12, 3.35e12, 450e9, 8, 50e9, 10e-6, 25e-6),
    # Google Cloud TPU v5e: 197 TFLOP/s bf16, HBM 819 GB/s, ICI 1,600 Gbps a chip, 256 chips a pod (2D torus).
    "tpu-v5e": Accelerator("TPU v5e", 197e12, 819e9, 100e9, 256, 100e9, 5e-6, 5e-6),
    # Google Cloud TPU v5p: 459 TFLOP/s bf16, HBM 2,765 GB/s, ICI 4,800 Gbps a chip, 8,960 chips a pod (3D torus).
    "tpu-v5p": Accelerator("TPU v5p", 459e12, 2765e9, 300e9, 8960, 300e9, 5e-6, 5e-6),
}


def collective_seconds(acc: Accelerator, collective: Collective) -> float:
    inside = collective.group <= acc.island
    if collective.group <= 1:
        return 0.0
    return (acc.latency if inside else acc.slow_latency) + collective.wire_bytes / (
        acc.link if inside else acc.slow_link
    )


def step_seconds(acc: Accelerator, flops: float, bytes_accessed: float, found: list[Collective]) -> dict[str, float]:
    """-> {compute, memory, collectives, step} seconds of one step on one device of `acc`."""
    compute, memory = flops / acc.peak_flops, bytes_accessed / acc.hbm
    talk = sum(collective_seconds(acc, c) for c in found)
    return {"compute": compute, "memory": memory, "collectives": talk, "step": max(compute, memory) + talk}


def costliest(acc: Accelerator, found: list[Collective]) -> str:
    """The collective kind that costs `acc` the most time, with its share of the step's collective time."""
    by_kind: dict[str, float] = {}
    for c in found:
        by_kind[c.kind] = by_kind.get(c.kind, 0.0) + collective_seconds(acc, c)
    if not by_kind or not sum(by_kind.values()):
        return ""
    kind = max(by_kind, key=by_kind.get)
    count = sum(c.kind == kind for c in found)
    return f"{kind} x{count} ({by_kind[kind] * 1e6:.0f} us)"
