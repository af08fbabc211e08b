"""Where a compiled program's HBM traffic goes, read from its optimized HLO instruction by instruction.

The compiler's `bytes accessed` (the raw counter) charges every operand and output of every instruction, wherever
the buffer lives. On a TPU much of a step runs in on-chip memory: the layout of a buffer in VMEM carries `S(1)`
(other spaces `S(n)`; HBM has none), and XLA streams float32 parameters into VMEM in chunks (`slice-start` /
`copy-start`), assembles them there (`ConcatBitcast`), casts and multiplies them there. The counter charges
each of those steps again, and each chunk's whole source array. The estimate here counts only bytes that cross
HBM, instruction by instruction over the program's top-level instructions (the entry computation and what its
while / call / conditional instructions run, a loop body once, as the counter does):

- a buffer is charged where it is read or written in HBM (memory space 0); on-chip buffers cost nothing;
- an async copy or slice (`*-start`) reads from HBM only what it moves (the slice, not its whole source), and
  writes to HBM only if its destination is there; its `*-done` moves nothing new;
- a fusion reads of an operand only what its fused computation takes of it, where that is a slice;
- parameters, tuples, bitcasts and constants move nothing.

`docs/tpu.md` has the toys it is validated on (programs whose minimum traffic is known) and the raw counter
beside it. Pure text: nothing here compiles.
"""

import collections
import dataclasses
import re

from bigr_jax.compile import hlo

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_COMPUTATION = re.compile(r"^(ENTRY )?%([\w.\-]+) ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLED = re.compile(r"\b(?:body|condition|to_apply|calls|true_computation|false_computation)=%([\w.\-]+)")
MOVES_NOTHING = {"parameter", "tuple", "get-tuple-element", "bitcast", "constant", "after-all", "partition-id",
                 "replica-id", "opt-barrier", "iota"}
SLICING = {"slice", "dynamic-slice", "gather"}


def _closing(text: str, start: int) -> int:
  """The index of the bracket closing the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}.get(text[i], 0)
    if depth == 0:
      return i
  raise ValueError(f"unbalanced HLO text: {text[start:start + 80]}")


def _top_level(type_text: str) -> list:
  """The top-level elements of a tuple type ('(a, (b, c), d)' -> ['a', '(b, c)', 'd']), or [the type]."""
  if not type_text.startswith("("):
    return [type_text]
  out, start, depth = [], 1, 0
  for i, ch in enumerate(type_text):
    depth += {"(": 1, "{": 1, "[": 1, ")": -1, "}": -1, "]": -1}.get(ch, 0)
    if (ch == "," and depth == 1) or depth == 0:
      out.append(type_text[start:i].strip())
      start = i + 1
    if depth == 0:
      break
  return [e for e in out if e]


@dataclasses.dataclass
class Instruction:
  name: str
  opcode: str
  type_text: str
  operands: list  # names, in order
  arguments: str  # the text between the parentheses (a parameter's number)
  op_name: str  # the source's module path (metadata), "" when the compiler made the instruction
  attributes: str  # the text after the operands

  @property
  def outputs(self) -> list:
    return hlo.buffers(self.type_text)


def parse(hlo_text: str) -> dict:
  """{computation: (is_entry, [Instruction])} of an HLO module's text."""
  computations, current = {}, None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      header = _COMPUTATION.match(line)
      if header and line.rstrip().endswith("{"):
        current = header.group(2)
        computations[current] = (bool(header.group(1)), [])
      continue
    match = _INSTRUCTION.match(line)
    if not match or current is None:
      continue
    rest = line[match.end():]
    if rest.startswith("("):
      end = _closing(rest, 0)
      type_text, rest = rest[:end + 1], rest[end + 2:]
    else:
      type_text, _, rest = rest.partition(" ")
    opcode, _, _ = rest.partition("(")
    start = len(opcode)
    end = _closing(rest, start)
    op_name = _OP_NAME.search(rest[end:])
    arguments = rest[start + 1:end]
    computations[current][1].append(Instruction(match.group(1), opcode, type_text,
                                                re.findall(r"%([\w.\-]+)", arguments), arguments,
                                                op_name.group(1) if op_name else "", rest[end + 1:]))
  return computations


def _run_computations(computations: dict) -> list:
  """The computations whose instructions run one by one: the entry's and what its while / call / conditional
  instructions run (a fusion's computation is part of that one instruction)."""
  todo = [name for name, (is_entry, _) in computations.items() if is_entry]
  seen = []
  while todo:
    name = todo.pop()
    if name in seen or name not in computations:
      continue
    seen.append(name)
    for ins in computations[name][1]:
      if ins.opcode in ("while", "call", "conditional"):
        todo += _CALLED.findall(ins.attributes)
        branches = re.search(r"branch_computations=\{([^}]*)\}", ins.attributes)
        todo += re.findall(r"%([\w.\-]+)", branches.group(1)) if branches else []
  return seen


def _fused_reads(computations: dict, fused: str) -> dict:
  """{operand index: bytes read} for a fused computation's parameters that it only slices."""
  if fused not in computations:
    return {}
  instructions = computations[fused][1]
  params = {ins.name: int(ins.arguments) for ins in instructions if ins.opcode == "parameter"}
  users = collections.defaultdict(list)
  for ins in instructions:
    for operand in ins.operands:
      users[operand].append(ins)
  reads = {}
  for name, number in params.items():
    if not users[name]:
      continue
    if all(user.opcode in SLICING and user.operands[0] == name for user in users[name]):
      reads[number] = sum(b.bytes for user in users[name] for b in user.outputs)
  return reads


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  opcode: str
  op_name: str
  target: str  # a custom call's target
  hbm_bytes: int


def _start_destination(ins: Instruction) -> hlo.Buffer:
  """What an async start fills: copy-start's result is (destination, source, context); the wrapped form of
  slice-start and the others is ((operands...), destination, context)."""
  elements = _top_level(ins.type_text)
  return hlo.buffers(elements[1] if elements[0].startswith("(") else elements[0])[0]


def rows(hlo_text: str) -> list:
  """Every top-level instruction with the HBM bytes it moves."""
  computations = parse(hlo_text)
  out = []
  for computation in _run_computations(computations):
    defined = {ins.name: ins for ins in computations[computation][1]}
    for ins in computations[computation][1]:
      if ins.opcode in MOVES_NOTHING or ins.opcode.endswith("-done"):
        continue
      operands = [defined[o].outputs if o in defined else [] for o in ins.operands]
      if ins.opcode.endswith("-start"):
        destination = _start_destination(ins)
        moved = destination.bytes
        hbm = (0 if destination.on_chip else moved) + sum(min(b.bytes, moved) for buffers in operands
                                                          for b in buffers if not b.on_chip)
      else:
        fused = re.search(r"calls=%([\w.\-]+)", ins.attributes) if ins.opcode == "fusion" else None
        sliced = _fused_reads(computations, fused.group(1)) if fused else {}
        hbm = sum(sliced.get(i, b.bytes) for i, buffers in enumerate(operands) for b in buffers if not b.on_chip)
        hbm += sum(b.bytes for b in ins.outputs if not b.on_chip)
      target = re.search(r'custom_call_target="([^"]+)"', ins.attributes)
      out.append(Row(ins.name, ins.opcode, ins.op_name, target.group(1) if target else "", hbm))
  return out


def source_of(row: Row) -> str:
  """The group a row's bytes go to: the model part its op_name names (a trunk block's attention or
  feed-forward, the transcoder, the embeddings, the rest of the loss), the optimizer and EMA update (the step's
  own ops, outside the model), or, for an instruction the compiler made (no op_name), its opcode."""
  if row.target == hlo.PALLAS_TPU_CALL:
    return "attention kernels (Pallas)"
  if not row.op_name:
    return f"made by the compiler: {row.target or row.opcode}"
  path = row.op_name
  if "BiGR" not in path and "BinaryAutoEncoder" not in path:
    return "outside the model (the optimizer, EMA and clipping; the sampler's own loop)"
  phase = "backward" if "transpose(" in path else "forward"
  for part, group in (("/attention/", "trunk block: attention"), ("/feed_forward/", "trunk block: feed-forward"),
                      ("/layers_", "trunk block: norms and adaLN"), ("denoise", "transcoder"),
                      ("embedding", "embeddings"), ("/trunk/", "trunk: outside the blocks")):
    if part in path:
      return f"{phase}: {group}"
  return f"{phase}: the rest of the model and the loss"


def kind_of(row: Row) -> str:
  """The kind of instruction: arithmetic (fusions and the ops XLA left unfused) or data movement by opcode."""
  if row.opcode in ("copy-start", "slice-start", "copy", "slice", "pad", "concatenate", "transpose",
                    "dynamic-slice", "dynamic-update-slice") or row.opcode.startswith(("all-", "reduce-scatter",
                                                                                          "collective-")):
    return f"data movement: {row.opcode.removesuffix('-start')}"
  if row.opcode == "custom-call":
    return f"custom call: {row.target}"
  return "arithmetic (fusions and unfused ops)"


def breakdown(hlo_text: str) -> dict:
  """{"hbm_bytes": the estimate, "by_source": {group: bytes}, "by_kind": {kind: bytes}}; each grouping sums to
  the estimate."""
  listed = rows(hlo_text)
  by_source, by_kind = collections.Counter(), collections.Counter()
  for row in listed:
    by_source[source_of(row)] += row.hbm_bytes
    by_kind[kind_of(row)] += row.hbm_bytes
  return {"hbm_bytes": sum(row.hbm_bytes for row in listed),
          "by_source": {g: b for g, b in by_source.most_common() if b},
          "by_kind": {k: b for k, b in by_kind.most_common() if b}}


def extrapolated(one: dict, two: dict, blocks: int) -> dict:
  """From a program's breakdown at 1 block and at 2 blocks: the breakdown at `blocks` blocks, each group by its
  own per-block difference (so the groups still sum to the total, and one that does not grow with depth may come
  out slightly negative from the two compiles' differences)."""
  scale = lambda a, b: a + (blocks - 1) * (b - a)  # noqa: E731
  grouped = {key: {g: scale(one[key].get(g, 0), two[key].get(g, 0)) for g in set(one[key]) | set(two[key])}
             for key in ("by_source", "by_kind")}
  return {"hbm_bytes": scale(one["hbm_bytes"], two["hbm_bytes"]),
          **{key: dict(sorted(groups.items(), key=lambda item: -item[1])) for key, groups in grouped.items()}}
