"""Reading a compiled program's HLO text: its collectives (and the bytes each chip sends for them) and its Pallas
kernels. Pure text: nothing here compiles or imports a model."""

import math
import re

COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_OP = re.compile(r"= (.+?) (" + "|".join(COLLECTIVES) + r")(-start)?\((.*)$")
_SHAPE = re.compile(r"\b(pred|[subf]\d+|bf16)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}
PALLAS_TPU_CALL = "tpu_custom_call"  # a Pallas (Mosaic) kernel in TPU HLO; the compiler counts no FLOPs inside


def _shape_bytes(dtype: str, dims: str) -> int:
  size = _BYTES.get(dtype) or max(1, int(dtype[1:]) // 8)
  return size * math.prod(int(d) for d in dims.split(",") if d)


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
    shapes = _SHAPE.findall(result_type)
    if started and len(shapes) > 1:  # an async start returns (operands, results): the results
      shapes = shapes[len(shapes) // 2:]
    result = sum(_shape_bytes(*s) for s in shapes)
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
