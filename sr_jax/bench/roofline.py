"""A step time projected from what one device computes, reads and sends (`sr_jax.bench.compiled`), on named
accelerators, from their published specifications (docs/PERFORMANCE.md cites them).

    step = max(max(FLOPs / peak, bytes accessed / HBM bandwidth) + sum over collectives (latency + wire bytes / link),
               a device's batch bytes / host link)

What it is: a projection from XLA:CPU's counts at 100% of peak FLOP/s and HBM bandwidth with no kernel launch
cost, so its compute and memory terms are lower bounds on their time (a step of many small kernels is bound by
their count, which no term here sees); the one pessimistic term is that compute and communication do not
overlap. The HBM term is XLA's count of bytes accessed on the machine it was compiled for. A collective whose
group spans more than one fast island (8 NVLink-joined GPUs of a DGX/HGX H100; a TPU pod's ICI) runs at the slow
link's bandwidth times `inter_node` (the share of line rate a collective gets between nodes; 0.6 by default). On
a TPU torus an all-to-all is bound by the torus's bisection, not by a chip's links: it gets `torus_share` of
them. Bandwidths are per direction per device (the published figures are bidirectional aggregates: halved). The
batch reaches a device over its host link while the step before it runs (`pipeline.prefetch_to_device`), so it
costs time only where it takes longer than the step: it matters where the input pipeline joins the text vectors
(data.text_join=host: 3 KB an example, its query's and item's 384-d float32 vectors, where its ids are about
0.1 KB).
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
    host_link: float  # bytes/s per device, host to device (the batch's way in)
    torus: int = 0  # the island's torus dimensions (TPU ICI: 2 on v5e, 3 on v5p); 0: a switched network


ACCELERATORS = {
    # NVIDIA H100 SXM5 datasheet: TF32 tensor 989 TFLOP/s with sparsity (494.7 dense), HBM3 3.35 TB/s, NVLink 4
    # 900 GB/s (bidirectional), PCIe Gen5 128 GB/s (bidirectional); DGX H100: 8 GPUs an NVLink island, one
    # ConnectX-7 400 Gb/s NIC per GPU.
    "h100": Accelerator("H100 SXM", 494.7e12, 3.35e12, 450e9, 8, 50e9, 10e-6, 25e-6, 64e9),
    # Google Cloud TPU v5e: 197 TFLOP/s bf16, HBM 819 GB/s, ICI 1,600 Gbps a chip, 256 chips a pod (2D torus).
    # The host link is not published per chip: taken as PCIe Gen4 x16 (32 GB/s each way), an assumption.
    "tpu-v5e": Accelerator("TPU v5e", 197e12, 819e9, 100e9, 256, 100e9, 5e-6, 5e-6, 32e9, torus=2),
    # Google Cloud TPU v5p: 459 TFLOP/s bf16, HBM 2,765 GB/s, ICI 4,800 Gbps a chip, 8,960 chips a pod (3D torus).
    # The host link as v5e's (an assumption).
    "tpu-v5p": Accelerator("TPU v5p", 459e12, 2765e9, 300e9, 8960, 300e9, 5e-6, 5e-6, 32e9, torus=3),
}


INTER_NODE = 0.6  # the share of the line rate a collective gets between nodes


def torus_share(group: int, dims: int) -> float:
    """The share of a chip's links an all-to-all over `group` chips of a k^dims torus gets: every chip sends half
    its bytes across the bisection, which has 2 k^(dims-1) links each way, against the chip's 2 dims links; so
    2/k on a 2-D torus, 4/(3k) on a 3-D one (at most 1)."""
    k = group ** (1 / dims)
    return min(1.0, (2 / k) if dims == 2 else 4 / (3 * k))


def collective_seconds(acc: Accelerator, collective: Collective, inter_node: float = INTER_NODE) -> float:
    inside = collective.group <= acc.island
    if collective.group <= 1:
        return 0.0
    link = acc.link if inside else acc.slow_link * inter_node
    if inside and acc.torus and collective.kind == "all-to-all":
        link *= torus_share(collective.group, acc.torus)
    return (acc.latency if inside else acc.slow_latency) + collective.wire_bytes / link


def step_seconds(
    acc: Accelerator,
    flops: float,
    bytes_accessed: float,
    found: list[Collective],
    inter_node: float = INTER_NODE,
    infeed_bytes: float = 0.0,
    kernels: int = 0,
) -> dict[str, float]:
    """-> {compute, memory, collectives, infeed, step} seconds of one step on one device of `acc`, and
    `us_per_kernel`: the compute or memory term over the step's `kernels` (`compiled.kernels`), in microseconds.
    Where a kernel costs more than that to launch and run (a few us on a GPU), the step is bound by its kernel
    count, not by its bytes: its projection is then an upper bound on its rate, not a projection. `infeed_bytes`:
    the device's share of a batch, moved from the host while the step before runs."""
    compute, memory = flops / acc.peak_flops, bytes_accessed / acc.hbm
    talk = sum(collective_seconds(acc, c, inter_node) for c in found)
    infeed = infeed_bytes / acc.host_link
    step = max(max(compute, memory) + talk, infeed)
    per_kernel = 1e6 * max(compute, memory) / kernels if kernels else float("inf")
    return {"compute": compute, "memory": memory, "collectives": talk, "infeed": infeed, "step": step,
            "us_per_kernel": per_kernel}  # fmt: skip


def costliest(acc: Accelerator, found: list[Collective], inter_node: float = INTER_NODE) -> str:
    """The collective kind that costs `acc` the most time, with its share of the step's collective time."""
    by_kind: dict[str, float] = {}
    for c in found:
        by_kind[c.kind] = by_kind.get(c.kind, 0.0) + collective_seconds(acc, c, inter_node)
    if not by_kind or not sum(by_kind.values()):
        return ""
    kind = max(by_kind, key=by_kind.get)
    count = sum(c.kind == kind for c in found)
    return f"{kind} x{count} ({by_kind[kind] * 1e6:.0f} us)"
