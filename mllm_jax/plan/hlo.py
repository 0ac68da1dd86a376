"""Counting a compiled program from its optimized HLO text: FLOPs of its dots and
convolutions and the bytes of its collectives, each multiplied by how often it runs.

XLA's `cost_analysis()` counts a while loop's body once; a scanned 32-layer decoder is a
loop, so its FLOPs would be counted for one layer. Here every computation is weighted by
the trip counts of the loops around it: the `known_trip_count` XLA records, or else the
bound its loop condition compares the counter with.
"""
import dataclasses
import math
import re

import numpy as np

DTYPE_BYTES = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2,
               "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8,
               "f64": 8, "c64": 8, "c128": 16}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all",
               "collective-permute", "ragged-all-to-all", "collective-broadcast")
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s")
_INSTR = re.compile(r"^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*")


@dataclasses.dataclass
class Instr:
    name: str
    shape: str  # the result type as printed, e.g. "bf16[8,128]{1,0}" or a tuple
    opcode: str
    operands: list
    args: str  # the text between the opcode's parentheses (a constant's value)
    attrs: str


@dataclasses.dataclass
class Collective:
    kind: str  # all-gather, all-reduce, reduce-scatter, all-to-all, collective-permute, ...
    bytes: float  # per device per execution: result (gathers) or operand (scatters)
    group: int  # devices in each replica group
    count: float  # executions per program run (loop trip counts multiplied)
    in_loop: bool
    op_name: str

    @property
    def wire_bytes(self) -> float:
        """Bytes each device sends per execution with ring algorithms."""
        n = max(self.group, 1)
        if self.kind == "collective-permute":
            return self.bytes
        factor = 2.0 if self.kind == "all-reduce" else 1.0
        return self.bytes * factor * (n - 1) / n


def array_dims(shape: str):
    """[(dtype, dims)] of every array in a printed type (tuples flattened)."""
    out = []
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in DTYPE_BYTES:
            out.append((dtype, [int(x) for x in dims.split(",") if x]))
    return out


def shape_bytes(shape: str) -> float:
    return sum(DTYPE_BYTES[t] * math.prod(d) for t, d in array_dims(shape))


def _matching(text: str, start: int) -> int:
    """Index just past the bracket that closes the one at text[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = [pairs[text[start]]]
    i = start + 1
    while stack and i < len(text):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif c == stack[-1]:
            stack.pop()
        i += 1
    return i


def _parse_instr(line: str):
    m = _INSTR.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _matching(rest, 0)
    else:
        end = rest.index(" ") if " " in rest else len(rest)
    shape, rest = rest[:end], rest[end:].lstrip()
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    close = _matching(rest, op.end() - 1)
    operands = re.findall(r"%([\w.\-]+)", rest[op.end():close - 1])
    return Instr(m.group(2), shape, op.group(1), operands, rest[op.end():close - 1],
                 rest[close:])


def parse(text: str):
    """{computation name: [Instr]} and the entry computation's name."""
    comps, entry, current = {}, None, None
    for line in text.splitlines():
        if current is None:
            if line.endswith("{") and not line.startswith((" ", "HloModule")):
                m = _HEADER.match(line)
                if m:
                    current = m.group(2)
                    comps[current] = []
                    if m.group(1):
                        entry = current
            continue
        if line.rstrip() == "}":  # (an instruction's attributes may span lines)
            current = None
            continue
        ins = _parse_instr(line)
        if ins is not None:
            comps[current].append(ins)
        elif comps[current]:  # the rest of an instruction printed over several lines
            comps[current][-1].attrs += "\n" + line
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    return comps, entry


def _attr(attrs: str, key: str):
    m = re.search(rf"\b{key}=%?([\w.\-]+)", attrs)
    return m.group(1) if m else None


def _dims(attrs: str, key: str):
    m = re.search(rf"\b{key}=\{{([0-9,]*)\}}", attrs)
    return [int(x) for x in m.group(1).split(",") if x] if m else []


class Program:
    """A parsed optimized HLO module: `flops()` and `collectives()` over one execution."""

    def __init__(self, text: str, num_devices: int = 1):
        self.comps, self.entry = parse(text)
        self.num_devices = num_devices
        self.by_name = {c: {i.name: i for i in instrs} for c, instrs in self.comps.items()}
        self.unknown_trip_counts = 0
        self.uncounted_kernels = 0  # Pallas kernels whose FLOPs are unknown (after flops())
        self.recomputed_flops = 0.0  # (after flops())
        self.weights = {}  # computation -> (executions per run, inside a loop)
        self._weigh(self.entry, 1.0, False)

    def _weigh(self, comp, mult, in_loop):
        old = self.weights.get(comp, (0.0, False))
        self.weights[comp] = (old[0] + mult, old[1] or in_loop)
        for ins in self.comps.get(comp, []):
            if ins.opcode == "while":
                body = _attr(ins.attrs, "body")
                self._weigh(body, mult * self._trip_count(comp, ins), True)
            elif ins.opcode == "conditional":
                m = re.search(r"branch_computations=\{([^}]*)\}", ins.attrs)
                for b in re.findall(r"%?([\w.\-]+)", m.group(1) if m else ""):
                    self._weigh(b, mult, in_loop)  # an upper bound: every branch
                for key in ("true_computation", "false_computation"):
                    if _attr(ins.attrs, key):
                        self._weigh(_attr(ins.attrs, key), mult, in_loop)
            elif ins.opcode in ("fusion", "call", "async-start", "custom-call"):
                for key in ("calls", "to_apply"):
                    if _attr(ins.attrs, key) in self.comps:
                        self._weigh(_attr(ins.attrs, key), mult, in_loop)

    def _trip_count(self, comp, ins) -> float:
        m = re.search(r'known_trip_count"?\s*:\s*\{\s*"?n"?\s*:\s*"?(\d+)', ins.attrs)
        if m:
            return float(m.group(1))
        cond = _attr(ins.attrs, "condition")
        instrs = self.by_name.get(cond, {})
        root = next((i for i in reversed(self.comps.get(cond, [])) if i.opcode == "compare"),
                    None)
        if root is not None:
            consts = [_constant(instrs.get(o)) for o in root.operands]
            direction = _attr(root.attrs, "direction")
            for bound, counter, ops in ((consts[1], root.operands[0], ("LT", "LE")),
                                        (consts[0], root.operands[1], ("GT", "GE"))):
                if bound is not None and direction in ops:
                    start = self._init_value(comp, ins, cond, counter)
                    step = self._step(ins, cond, counter)
                    span = bound - start + (direction in ("LE", "GE"))
                    return max(0.0, math.ceil(span / step))
        self.unknown_trip_counts += 1
        return 1.0

    def _step(self, loop, cond, counter) -> float:
        """How much the loop body adds to the counter (a loop unrolled k times adds k)."""
        gte = self.by_name[cond].get(counter)
        index = re.search(r"index=(\d+)", gte.attrs) if gte is not None else None
        body = _attr(loop.attrs, "body")
        instrs = self.comps.get(body, [])
        root = instrs[-1] if instrs else None
        if index is None or root is None or root.opcode != "tuple":
            return 1.0
        k = int(index.group(1))
        update = self.by_name[body].get(root.operands[k]) if k < len(root.operands) else None
        if update is not None and update.opcode == "add":
            for o in update.operands:
                c = _constant(self.by_name[body].get(o))
                if c is not None and c > 0:
                    return c
        return 1.0

    def _init_value(self, comp, loop, cond, counter) -> float:
        """The loop counter's initial value when the loop's init tuple holds a constant."""
        gte = self.by_name[cond].get(counter)
        index = re.search(r"index=(\d+)", gte.attrs) if gte is not None else None
        init = self.by_name[comp].get(loop.operands[0]) if loop.operands else None
        if index and init is not None and init.opcode == "tuple":
            k = int(index.group(1))
            if k < len(init.operands):
                v = _constant(self.by_name[comp].get(init.operands[k]))
                if v is not None:
                    return v
        return 0.0

    def flops(self) -> float:
        """2 x multiply-adds of every dot and convolution, per execution of the program,
        plus the Pallas splash attention kernels' (`kernel_flops`)."""
        total = 0.0
        self.uncounted_kernels = 0
        self.recomputed_flops = 0.0  # of `total`: in rematerialized computations
        for comp, (mult, _) in self.weights.items():
            names = self.by_name.get(comp, {})
            for ins in self.comps.get(comp, []):
                if ins.opcode in ("dot", "convolution"):
                    found = _matmul_flops(ins, names)
                elif ins.opcode == "custom-call" and "tpu_custom_call" in ins.attrs:
                    found = kernel_flops(ins)
                    self.uncounted_kernels += found is None
                else:
                    continue
                total += mult * (found or 0.0)
                if "rematted_computation" in _op_name(ins.attrs):
                    self.recomputed_flops += mult * (found or 0.0)
        return total

    def collectives(self) -> list:
        """Every collective once, with how often it runs. TPU programs keep a copy of an
        asynchronous collective in each fused computation of its phases (start,
        continuations, done), all with its channel id and op name: such a collective counts
        once, at its most frequent copy. Collectives of one computation are all counted:
        those written in a shard_map may share a channel id and an op name on CPU."""
        copies = {}  # (kind, channel, op name) -> {computation: [Collective]}
        for comp, (mult, in_loop) in self.weights.items():
            names = self.by_name.get(comp, {})
            for ins in self.comps.get(comp, []):
                kind = ins.opcode[:-len("-start")] if ins.opcode.endswith("-start") \
                    else ins.opcode
                if kind not in COLLECTIVES:
                    continue
                found = Collective(kind, self._collective_bytes(ins, kind, names),
                                   self._group_size(ins.attrs), mult, in_loop,
                                   _op_name(ins.attrs))
                channel = re.search(r"\bchannel_id=(\d+)", ins.attrs)
                key = ((kind, channel.group(1), found.op_name) if channel
                       else (comp, ins.name))
                copies.setdefault(key, {}).setdefault(comp, []).append(found)
        return [c for by_comp in copies.values()
                for c in max(by_comp.values(), key=lambda cs: cs[0].count)]

    def _collective_bytes(self, ins, kind, names) -> float:
        arrays = array_dims(ins.shape)
        sizes = [DTYPE_BYTES[t] * math.prod(d) for t, d in arrays]
        if ins.opcode.endswith("-start") and kind == "all-gather":
            return sum(sizes[len(sizes) // 2:])  # (operands, results)
        if ins.opcode.endswith("-start") and kind == "collective-permute":
            return sizes[0] if sizes else 0.0  # (operand, result, contexts)
        if kind == "reduce-scatter":
            return sum(shape_bytes(names[o].shape) for o in ins.operands if o in names)
        return sum(sizes)

    def _group_size(self, attrs: str) -> int:
        m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attrs)
        if m:
            sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
            return math.prod(int(sizes[a]) for a in re.findall(r"'([^']+)'", m.group(2)))
        m = re.search(r"replica_groups=\[([0-9,]+)\]<=", attrs)
        if m:
            return int(m.group(1).split(",")[-1])
        m = re.search(r"replica_groups=\{\{([0-9,]*)\}", attrs)
        if m:
            return len([x for x in m.group(1).split(",") if x])
        return self.num_devices


def kernel_flops(ins):
    """FLOPs of a Pallas TPU kernel, which the HLO does not state: for the splash attention
    kernels (forward, dq, dkv) 4 x (batch x) heads x queries x keys x head_dim each, the attention
    FLOPs of the model count's convention (forward once, the backward twice the forward),
    over every block: the blocks a mask lets the kernel skip and its recomputations are
    not counted. None for other kernels."""
    if not re.match(r"splash_mha_(fwd|dq|dkv)", ins.name):
        return None
    m = re.search(r"operand_layout_constraints=\{", ins.attrs)
    text = ins.attrs[m.end() - 1:_matching(ins.attrs, m.end() - 1)] if m else ""
    # q, k, v: [(batch,) heads, length, head_dim], after the block masks (int8)
    arrays = [d for t, d in array_dims(text) if len(d) >= 3 and t in ("bf16", "f16", "f32")]
    if len(arrays) < 2:
        return None
    return 4.0 * math.prod(arrays[0]) * arrays[1][-2]


def _constant(ins):
    if ins is None or ins.opcode != "constant":
        return None
    m = re.fullmatch(r"\s*(-?\d+)\s*", ins.args)
    return float(m.group(1)) if m else None


def _op_name(attrs: str) -> str:
    m = re.search(r'op_name="([^"]*)"', attrs)
    return m.group(1) if m else ""


def _matmul_flops(ins, names) -> float:
    out = sum(math.prod(d) for _, d in array_dims(ins.shape)[:1])
    if not ins.operands or ins.operands[0] not in names:
        return 0.0
    lhs = array_dims(names[ins.operands[0]].shape)
    if ins.opcode == "dot":
        dims = lhs[0][1] if lhs else []
        contract = math.prod(dims[i] for i in _dims(ins.attrs, "lhs_contracting_dims"))
        return 2.0 * out * contract
    return _conv_flops(ins, names)


def _conv_flops(ins, names) -> float:
    """2 x (output elements without the spatial dims) x input features per group x, per
    spatial dim, the (output, window) position pairs that meet a real input element:
    dilation holes and padding do no work. (TPU programs write batched matmuls as
    convolutions whose window of n steps over an n-times dilated input meets one element.)"""
    labels = re.search(r"dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)", ins.attrs)
    if not labels or len(ins.operands) < 2 or not all(o in names for o in ins.operands[:2]):
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    lhs = array_dims(names[ins.operands[0]].shape)[0][1]
    rhs = array_dims(names[ins.operands[1]].shape)[0][1]
    out = array_dims(ins.shape)[0][1]
    window = _window(ins.attrs)
    pairs = 1
    for k, digit in enumerate(sorted(c for c in out_l if c.isdigit())):
        w = {key: (vals[k] if k < len(vals) else None) for key, vals in window.items()}
        pairs *= _window_pairs(lhs[lhs_l.index(digit)], rhs[rhs_l.index(digit)],
                               out[out_l.index(digit)], w.get("stride") or 1,
                               (w.get("pad") or (0, 0))[0], w.get("lhs_dilate") or 1,
                               w.get("rhs_dilate") or 1)
    rest = math.prod(n for n, c in zip(out, out_l) if not c.isdigit())
    return 2.0 * rest * rhs[rhs_l.index("i")] * pairs


def _window(attrs: str) -> dict:
    m = re.search(r"window=\{([^}]*)\}", attrs)
    out = {}
    for key, value in re.findall(r"(\w+)=([0-9x_\-]+)", m.group(1) if m else ""):
        parts = value.split("x")
        out[key] = [tuple(int(v) for v in p.split("_")) if key == "pad" else int(p)
                    for p in parts]
    return out


def _window_pairs(n, k, m, stride, pad_lo, lhs_dilate, rhs_dilate) -> int:
    """(output position, window position) pairs of one spatial dim that read a real input
    element (not padding, not a hole of the input's dilation)."""
    pos = (np.arange(m)[:, None] * stride + np.arange(k)[None, :] * rhs_dilate - pad_lo)
    real = (pos >= 0) & (pos <= (n - 1) * lhs_dilate) & (pos % lhs_dilate == 0)
    return int(real.sum())
