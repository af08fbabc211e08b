"""Reading a compiled program's HLO text: its collectives (and the bytes each chip sends for them) and its Pallas
kernels, and the arrays of a type with their bytes and memory space. Pure text: nothing here compiles or imports
a model."""

import dataclasses
import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\((.*)$")
_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2, "f16": 2,
                "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8,
                "c128": 16, "token": 0}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\](?:\{([^{}]*(?:\([^()]*\))*[^{}]*)\})?")
PALLAS_TPU_CALL = "tpu_custom_call"  # a Pallas (Mosaic) kernel in TPU HLO; the compiler counts no FLOPs inside


@dataclasses.dataclass(frozen=True)
class Buffer:
  bytes: int
  on_chip: bool  # in a memory space other than HBM's


def buffers(type_text: str) -> list:
  """The arrays of an HLO type (a tuple's, flattened), with their bytes and memory space."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(type_text):
    if dtype not in _DTYPE_BYTES:
      continue
    space = re.search(r"S\((\d+)\)", layout or "")
    out.append(Buffer(_DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d),
                      bool(space and space.group(1) != "0")))
  return out


def _group_size(attributes: str, num_devices: int) -> int:
  """Devices in each replica group: from the mesh form (`mesh['axis_0'=2,...] ... {'axis_0'}`) or the list
  form (`{{0,1},{2,3}}`)."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]", attributes)
  if mesh:
    sizes = dict((name, int(size)) for name, size in re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    chosen = re.search(r"\{('[^}]*)\}", attributes[mesh.end():])  # the group's axes: {'axis_0'}
    axes = re.findall(r"'(\w+)'", chosen.group(1)) if chosen else list(sizes)
    return math.prod(sizes.get(a, 1) for a in axes) or 1
  groups = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)
  if groups:
    return len([g for g in groups.group(1).split(",") if g])
  return num_devices


def collectives(hlo_text: str, num_devices: int) -> dict:
  """{kind: {count, bytes}}: the collectives of a compiled HLO module (a loop body once) and the bytes each
  chip sends for them."""
  out = {}
  for line in hlo_text.splitlines():
    match = _OP.search(line)
    if not match:
      continue
    result_type, kind, started, attributes = match.groups()
    arrays = buffers(result_type)
    if started and len(arrays) > 1:  # an async start returns (operands, results): the results
      arrays = arrays[len(arrays) // 2:]
    result = sum(b.bytes for b in arrays)
    g = _group_size(attributes, num_devices)
    sent = {"all-gather": result * (g - 1) / g, "reduce-scatter": result * (g - 1),
            "all-reduce": 2 * result * (g - 1) / g, "all-to-all": result * (g - 1) / g,
            "collective-permute": result}[kind]
    entry = out.setdefault(kind, {"count": 0, "bytes": 0.0})
    entry["count"] += 1
    entry["bytes"] += sent
  return out


def pallas_kernels(hlo_text: str) -> int:
  """How many Pallas kernel calls the module holds (a loop body once)."""
  return hlo_text.count(f'custom_call_target="{PALLAS_TPU_CALL}"')
