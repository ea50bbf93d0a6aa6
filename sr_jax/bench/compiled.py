"""What one device computes and sends, read from a compiled (SPMD-partitioned) program.

XLA compiles one program per device: its `cost_analysis()` counts that device's floating-point operations and
bytes accessed, and its HLO text lists every collective with its result shape and replica groups. From those
this module derives each collective's bytes on the wire per device under the usual ring/pairwise algorithms
(the figures a roofline needs). A collective inside a loop body (a scan: `train.grad_accum`) is counted once.
"""

from __future__ import annotations

import dataclasses
import math
import re

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
               "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}  # fmt: skip

_OP = re.compile(
    r"=\s*(?P<shape>\([^()]*\)|[a-z0-9]+\[[^\]]*\](?:\{[^}]*\})?)\s+(?P<kind>"
    + "|".join(KINDS)
    + r")(?P<start>-start)?\("
)
_ARRAY = re.compile(r"([a-z0-9]+)\[([0-9,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([0-9,]*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")
_GROUPS_MESH = re.compile(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[[^\]]*\](?:T\([^)]*\))?\))? \{([^}]*)\}")


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # one of KINDS
    group: int  # devices that take part together
    bytes: int  # its result on one device
    line: str  # the HLO instruction (its start)

    @property
    def wire_bytes(self) -> float:
        """Bytes one device sends: ring all-reduce 2(n-1)/n x size; all-gather and all-to-all (n-1)/n x the
        result; reduce-scatter (n-1) x its result (a 1/n piece of the input); a permute its result."""
        n = self.group
        if n <= 1:
            return 0.0
        factor = {"all-reduce": 2 * (n - 1) / n, "all-gather": (n - 1) / n, "reduce-scatter": n - 1,
                  "all-to-all": (n - 1) / n, "collective-permute": 1.0}[self.kind]  # fmt: skip
        return factor * self.bytes


def _array_bytes(text: str) -> list[int]:
    return [
        DTYPE_BYTES.get(dtype, 4) * math.prod(int(d) for d in dims.split(",") if d)
        for dtype, dims in _ARRAY.findall(text)
    ]


def collectives(hlo: str, devices: int) -> list[Collective]:
    """Every collective of a compiled program's HLO text (`compiled.as_text()`); `devices`: the group of one with
    no replica groups (all devices)."""
    found = []
    for line in hlo.splitlines():
        match = _OP.search(line)
        if not match:
            continue
        sizes = _array_bytes(match["shape"])
        # an async start's result is a tuple holding its operand and its result: the larger is what it moves
        size = max(sizes) if match["start"] else sum(sizes)
        if on_mesh := _GROUPS_MESH.search(line):  # mesh['axis_0'=4,'axis_1'=2] {'axis_0'}: over those axes
            sizes = {k.strip("' "): int(v) for k, v in (a.split("=") for a in on_mesh[1].split(","))}
            group = math.prod(sizes[a.strip("' ")] for a in on_mesh[2].split(",") if a.strip())
        elif iota := _GROUPS_IOTA.search(line):
            group = int(iota[2])
        elif (listed := _GROUPS_LIST.search(line)) and listed[1]:
            group = len(listed[1].split(","))
        else:
            group = 2 if match["kind"] == "collective-permute" else devices
        found.append(Collective(match["kind"], group, size, line.strip()[:200]))
    return found


# instructions that move or compute nothing on their own (names, views, tuples, inputs): not a kernel
_NOT_KERNELS = ("parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all", "partition-id",
                "replica-id", "opt-barrier")  # fmt: skip
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%\S+ = .*?\s([a-z][a-z0-9-]*)\(", re.M)


def kernels(hlo: str) -> int:
    """The kernels a compiled program's entry computation launches in a step: its instructions but those in
    _NOT_KERNELS (a fusion, a dot, a copy, a collective, a loop each count one; a loop body is not counted per
    iteration). A step of many small kernels is bound by their count, which neither FLOPs nor bytes see; the
    count is the compiling backend's (XLA:CPU fuses differently from XLA:GPU)."""
    entry = hlo[hlo.index("\nENTRY ") :]
    body = entry[: entry.index("\n}")]
    return sum(op not in _NOT_KERNELS for op in _INSTRUCTION.findall(body))


def step_cost(compiled) -> tuple[float, float]:
    """XLA's count of a compiled program's floating-point operations and bytes accessed (per device), the latter
    less `all_to_all_overcount`."""
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    accessed = float(cost.get("bytes accessed", 0.0)) - all_to_all_overcount(compiled.as_text())
    return float(cost.get("flops", 0.0)), accessed


_COMPUTATION = re.compile(r"^(%[\w.-]+) \(([^)]*)\) -> ([a-z0-9]+\[[0-9,]*\])", re.M)
_PIECE = re.compile(r"fusion\([^\n]*calls=(%[\w.-]+), metadata=\{op_name=\"[^\"]*all_to_all\"")


def all_to_all_overcount(hlo: str) -> float:
    """XLA feeds an all-to-all one piece per peer, each a fusion that reads 1/D of its operands (the buffer to
    send, and what it is computed from), and its CPU cost model counts every such fusion as reading the whole of
    them: D pieces count D times the buffer (a cost that grows with D and is not real). -> the bytes counted
    beyond each piece's share (its output's share of its largest operand)."""
    computations = {m[1]: (_array_bytes(m[2]), _array_bytes(m[3])[0]) for m in _COMPUTATION.finditer(hlo)}
    over = 0.0
    for call in _PIECE.findall(hlo):
        operands, output = computations.get(call, ([], 0))
        if operands and output < max(operands):
            over += sum(operands) * (1 - output / max(operands))
    return over


def summary(found: list[Collective]) -> dict[str, dict]:
    """kind -> {count, bytes (results), wire_bytes, groups}: a compiled program's collectives in a few numbers."""
    out: dict[str, dict] = {}
    for c in found:
        row = out.setdefault(c.kind, {"count": 0, "bytes": 0, "wire_bytes": 0.0, "groups": []})
        row["count"] += 1
        row["bytes"] += c.bytes
        row["wire_bytes"] += c.wire_bytes
        if c.group not in row["groups"]:
            row["groups"].append(c.group)
    return out
