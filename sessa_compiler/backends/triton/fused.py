"""Fused elementwise / norm kernels generated from ``fused`` nodes (ir/ops_fused.py, passes/fuse.py).

One program owns ``BLOCK_R`` rows of the group's [rows, N] grid and keeps them as a
[BLOCK_R, BLOCK_N] tile in registers: operands are loaded once (``row`` through a row stride, so
split/reshape views are read in place; ``rowscalar`` as a [BLOCK_R, 1] column; ``vec`` and ``scalar``
broadcast), every op of the body runs in fp32, and only the group's outputs are stored, in their
declared dtype. ``rowwise`` kernels hold a layer_norm (a row reduction); ``pointwise`` kernels do not.

The kernel's name and source depend on the ops, widths and dtypes only (comments name operands by
position, not by IR value name, and the group number is not in the source), so identical groups in different layers share one compiled kernel, and the number
of rows (B * T) is a runtime argument: a new sequence length does not recompile.

The eager meaning of ``fused`` (run the body op by op) is in sessa_compiler/semantics (table.py).
"""
from __future__ import annotations

import math

from ...errors import UnsupportedError
from ...ir.graph import Node, Value
from ...ir.ops_fused import classify, parse_body, row_space
from ...ir.types import format_dim
from .codegen import AOT_POINTER, TRITON_DTYPE, KernelSource, next_pow2

FUSED_DTYPES = ("f32", "f16", "bf16")
TILE_ELEMENTS = 4096   # elements of one program's tile (registers); BLOCK_R = TILE_ELEMENTS / BLOCK_N
MAX_BLOCK_R = 64


# -- code generation -------------------------------------------------------------------------------------
_UNARY = {"neg": "-{0}", "exp": "tl.exp({0})", "log": "tl.log({0})", "sqrt": "tl.sqrt({0})",
          "rsqrt": "tl.rsqrt({0})", "tanh": "_tanh({0})", "sigmoid": "tl.sigmoid({0})",
          "silu": "{0} * tl.sigmoid({0})", "relu": "tl.maximum({0}, 0.0, propagate_nan=tl.PropagateNan.ALL)",
          "abs": "tl.abs({0})",
          "sin": "tl.sin({0})", "cos": "tl.cos({0})", "erf": "tl.erf({0})", "reciprocal": "1.0 / {0}",
          "floor": "tl.floor({0})", "ceil": "tl.ceil({0})", "round": "_round({0})",
          "sign": "tl.where({0} > 0, 1.0, tl.where({0} < 0, -1.0, 0.0))",   # torch.sign(NaN) = 0
          "expm1": "_expm1({0})", "log1p": "_log1p({0})", "exp2": "tl.exp2({0})", "log2": "tl.log2({0})",
          "detach": "{0}"}
_BINARY = {"add": "{0} + {1}", "sub": "{0} - {1}", "mul": "{0} * {1}", "div": "{0} / {1}",
           "maximum": "tl.maximum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)",   # NaN in, NaN out, as torch
           "minimum": "tl.minimum({0}, {1}, propagate_nan=tl.PropagateNan.ALL)"}
_IDENTITY = ("squeeze", "unsqueeze", "reshape")

_HELPERS = '''@triton.jit
def _tanh(x):
    # tanh from one exp of a non-positive argument: no overflow, full fp32 accuracy near 0
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _round(x):
    # half to even, as torch.round (libdevice.rint has no interpreter form); |x| >= 2^23 is already an integer
    r = tl.floor(x + 0.5)
    r = tl.where((r - x == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)
    return tl.where(tl.abs(x) >= 8388608.0, x, r)


@triton.jit
def _expm1(x):
    # Kahan: (u - 1) (x / log(u)), u = exp(x), exact where u rounds to 1 (x itself), to inf or to 0
    u = tl.exp(x)
    um1 = u - 1.0
    y = tl.where(um1 == -1.0, -1.0, um1 * (x / tl.log(u)))   # x / log(u) ~ 1: no overflow
    y = tl.where(u == float("inf"), u, y)
    return tl.where(u == 1.0, x, y)


@triton.jit
def _log1p(x):
    # Goldberg: log(u) (x / (u - 1)), u = 1 + x; x itself where u rounds to 1
    u = x + 1.0
    y = tl.log(u) * (x / (u - 1.0))
    y = tl.where(u == float("inf"), u, y)
    return tl.where(u == 1.0, x, y)


'''


def _literal(x) -> str:
    x = float(x)
    if not math.isfinite(x):
        raise UnsupportedError(f"op 'fused': literal {x} has no Triton spelling in a fused kernel")
    return repr(x)


def _expr(n: Node, args: list) -> list:
    """Lines computing ``n`` from operand expressions; the last line's value is the result (``{out}``)."""
    op = n.op
    if op in _UNARY:
        return [_UNARY[op].format(*args)]
    if op in _BINARY:
        return [_BINARY[op].format(*args)]
    if op in _IDENTITY:
        return [args[0]]
    if op == "cast":
        dt = n.attrs["dtype"].name
        if dt not in TRITON_DTYPE or dt == "f64":
            raise UnsupportedError(f"op 'fused': cast to {dt} is not fusible")
        return [args[0] if dt == "f32" else f"{args[0]}.to({TRITON_DTYPE[dt]}).to(tl.float32)"]
    if op == "gelu":
        x = args[0]
        if n.attrs.get("approximate", "none") == "tanh":
            return [f"0.5 * {x} * (1.0 + _tanh(0.7978845608028654 * ({x} + 0.044715 * {x} * {x} * {x})))"]
        return [f"0.5 * {x} * (1.0 + tl.erf({x} * 0.7071067811865476))"]
    if op == "softplus":
        beta, threshold = float(n.attrs.get("beta", 1)), float(n.attrs.get("threshold", 20))
        x = args[0]
        # torch's rule: x itself above the threshold; the exp is clamped so it never overflows
        return [(f"tl.where({x} * {beta!r} > {threshold!r}, {x}, "
                 f"tl.log(1.0 + tl.exp(tl.minimum({x} * {beta!r}, {threshold!r}))) / {beta!r})")]
    if op == "layer_norm":
        x, w, b = (args + [None, None])[:3]
        eps = float(n.attrs["eps"])
        y = f"{{c}} * tl.rsqrt({{v}} + {eps!r})" + (f" * {w}" if w else "") + (f" + {b}" if b else "")
        return [f"{{m}} = tl.sum(tl.where(cmask, {x}, 0.0), axis=1)[:, None] / N",
                f"{{c}} = tl.where(cmask, {x} - {{m}}, 0.0)",
                "{v} = tl.sum({c} * {c}, axis=1)[:, None] / N",
                y]  # biased variance, as torch's layer_norm
    raise UnsupportedError(f"op 'fused': no Triton lowering for op '{op}' inside a fused group")


def _kernel_name(body) -> str:
    ops = []
    for n in body.nodes:
        if n.op not in ops and n.op not in _IDENTITY:
            ops.append(n.op)
    return "fused_" + "_".join(ops)[:48]


def fused_layout(node: Node):
    """(body, L, N, operand classes, output classes) of a fused node."""
    body = parse_body(node)
    space = row_space(body)
    if space is None:
        raise UnsupportedError("op 'fused': the group's values do not fit one [rows, N] grid")
    L, N = space
    ins = [classify(v.type.shape, L, N) for v in body.inputs]
    outs = [classify(v.type.shape, L, N) for v in body.outputs]
    return body, L, N, ins, outs


def generate_fused(node: Node, dtypes: dict, interpret: bool) -> KernelSource:
    """``dtypes``: ``in{i}`` -> dtype of operand i (as run); outputs keep their declared dtypes."""
    body, L, N, ins, outs = fused_layout(node)
    out_dtypes = [v.type.dtype.name for v in body.outputs]
    in_dtypes = [dtypes.get(f"in{i}", v.type.dtype.name) for i, v in enumerate(body.inputs)]
    for dt in in_dtypes + out_dtypes:
        if dt not in FUSED_DTYPES:
            raise UnsupportedError(f"op 'fused': dtype {dt} has no fused kernel (expected one of {FUSED_DTYPES})")
    block_n = next_pow2(N)
    block_r = max(1, min(MAX_BLOCK_R, TILE_ELEMENTS // block_n))
    num_warps = 4 if block_r * block_n <= 4096 else (8 if block_r * block_n <= 8192 else 16)
    name = _kernel_name(body)
    kind = node.attrs["kernel"]

    params, sig, dns = [], {}, ["R"]
    for i, cls in enumerate(ins):
        params.append(f"X{i}")
        sig[f"X{i}"] = AOT_POINTER[in_dtypes[i]]
        if cls in ("row", "rowscalar"):
            params.append(f"stride_x{i}")
            sig[f"stride_x{i}"] = "i64"
            dns.append(f"stride_x{i}")
    for j, cls in enumerate(outs):
        params += [f"Y{j}", f"stride_y{j}"]
        sig[f"Y{j}"] = AOT_POINTER[out_dtypes[j]]
        sig[f"stride_y{j}"] = "i64"
        dns.append(f"stride_y{j}")
    params.append("R")
    sig["R"] = "i32"

    lines = ["    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)",
             "    cols = tl.arange(0, BLOCK_N)",
             "    rmask = (rows < R)[:, None]",
             "    cmask = (cols < N)[None, :]"]
    names: dict = {}
    for i, (v, cls) in enumerate(zip(body.inputs, ins)):
        var = f"x{i}"
        names[v] = var
        where = f"# operand {i}: {v.type} ({cls})"
        if cls == "row":
            load = f"tl.load(X{i} + rows[:, None] * stride_x{i} + cols[None, :], mask=rmask & cmask, other=0.0)"
        elif cls == "rowscalar":
            load = f"tl.load(X{i} + rows[:, None] * stride_x{i}, mask=rmask, other=0.0)"
        elif cls == "vec":
            load = f"tl.load(X{i} + cols[None, :], mask=cmask, other=0.0)"
        else:
            load = f"tl.load(X{i})"
        lines += [f"    {where}", f"    {var} = {load}.to(tl.float32)"]
    for k, n in enumerate(body.nodes):
        args = [names[x] if isinstance(x, Value) else _literal(x) for x in n.inputs if x is not None]
        if n.op == "layer_norm":
            args = [names[x] if isinstance(x, Value) else None for x in n.inputs] + [None, None]
            args = args[:3]
        steps = _expr(n, args)
        out = f"t{k}"
        tmp = {"m": f"{out}_mean", "c": f"{out}_centred", "v": f"{out}_var"}
        attrs = ", ".join(f"{a}={b}" for a, b in n.attrs.items())
        shown = ", ".join(names[x] if isinstance(x, Value) else format_operand_name(x) for x in n.inputs)
        lines.append(f"    # {n.op}({shown})" + (f" {{{attrs}}}" if attrs else "") + f" -> {n.output.type}")
        for s in steps[:-1]:
            lines.append("    " + s.format(**tmp))
        lines.append(f"    {out} = " + steps[-1].format(**tmp))
        names[n.output] = out
    for j, (v, cls) in enumerate(zip(body.outputs, outs)):
        dt = TRITON_DTYPE[out_dtypes[j]]
        if cls == "row":
            lines.append(f"    tl.store(Y{j} + rows[:, None] * stride_y{j} + cols[None, :], "
                         f"({names[v]} + tl.zeros((BLOCK_R, BLOCK_N), tl.float32)).to({dt}), mask=rmask & cmask)")
        else:
            lines.append(f"    tl.store(Y{j} + rows[:, None] * stride_y{j}, "
                         f"({names[v]} + tl.zeros((BLOCK_R, 1), tl.float32)).to({dt}), mask=rmask)")

    consts = {"N": N, "BLOCK_N": block_n, "BLOCK_R": block_r}
    src = "".join(f"{a} = tl.constexpr({b!r})\n" for a, b in consts.items()) + "\n\n"
    src += _HELPERS if any(f"_{h}(" in "\n".join(lines) for h in ("tanh", "round", "expm1", "log1p")) else ""
    src += f"@triton.jit\ndef {name}({', '.join(params)}):\n" + "\n".join(lines) + "\n"
    chain = " -> ".join(n.op for n in body.nodes)
    spec = {"kind": kind, "ops": chain, "rows": "*".join(format_dim(d) for d in L) or "1", "N": N,
            "operands": " ".join(f"{c}:{dt}" for c, dt in zip(ins, in_dtypes)),
            "outputs": " ".join(f"{c}:{dt}" for c, dt in zip(outs, out_dtypes))}
    return KernelSource(name, f"fused ({kind}: {chain})", spec, {"BLOCK_R": block_r, "BLOCK_N": block_n}, src, sig,
                        do_not_specialize=tuple(dns), num_warps=num_warps, num_stages=1, uses_dot=False)


def format_operand_name(x) -> str:
    return f"%{x.name}" if isinstance(x, Value) else ("None" if x is None else _literal(x))


def launch_fused(kernel, node: Node, args: list, out: list | None = None):
    """Run a fused node's kernel on torch tensors; returns its outputs (a tuple when more than one).
    ``out`` (tests): preallocated contiguous outputs to write into."""
    import torch

    body, L, N, ins, outs = fused_layout(node)
    r = len(L)
    lead = None
    for x, cls in zip(args, ins):
        if cls in ("row", "rowscalar"):
            lead = tuple(x.shape[:r])
            break
    if lead is None:
        raise UnsupportedError("op 'fused': no operand spans the rows; cannot size the outputs")
    rows = math.prod(lead)
    call = []
    for x, cls in zip(args, ins):
        if cls == "row":
            t = x.reshape(rows, N)
        elif cls == "rowscalar":
            t = x.reshape(rows, 1)
        else:
            t = x.reshape(-1).contiguous()
        if cls in ("row", "rowscalar"):
            if t.stride(1) != 1 and N > 1:
                t = t.contiguous()
            call += [t, t.stride(0)]
        else:
            call.append(t)
    from ...ir.dtypes import to_torch

    results = []
    for j, (v, cls) in enumerate(zip(body.outputs, outs)):
        shape = lead + tuple(v.type.shape[r:]) if cls == "row" else lead + tuple(1 for _ in v.type.shape[r:])
        y = torch.empty(shape, dtype=to_torch(v.type.dtype), device=args[0].device) if out is None else out[j]
        if tuple(y.shape) != shape or not y.is_contiguous():
            raise UnsupportedError(f"op 'fused': output {j} must be a contiguous {shape}, got {tuple(y.shape)}")
        results.append(y)
        call += [y, N if cls == "row" else 1]
    if rows:
        src = kernel.source
        grid = (-(-rows // src.tunables["BLOCK_R"]),)
        kernel.fn[grid](*call, rows, num_warps=src.num_warps, num_stages=src.num_stages)
        kernel.launches += 1
    return tuple(results) if len(results) != 1 else results[0]
