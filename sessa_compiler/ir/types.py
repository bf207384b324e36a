"""Value types of the IR: a dtype and a shape whose dims are ints or symbolic expressions.

Batch and sequence length stay symbolic (sympy expressions over named symbols such as ``B`` and
``T``), so one graph serves every sequence length. This module does not import torch.
"""
from __future__ import annotations

import ast
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Mapping, Union

import sympy

from ..errors import IRError, ParseError

# Short names used in the text format, in the order a reader meets them most.
DTYPES = ("f64", "f32", "f16", "bf16", "i64", "i32", "i16", "i8", "u8", "bool", "c64", "c128")
# complex values appear only where a module computes with them (complex RoPE); they run as torch ops
# (the recognisers fold the rotation into attention) and no kernel or export takes them
FLOAT_DTYPES = frozenset({"f64", "f32", "f16", "bf16"})


@dataclass(frozen=True)
class DType:
    """An element type, printed as its short name (``f32``); in attributes as ``dtype.f32``."""

    name: str

    def __post_init__(self):
        if self.name not in DTYPES:
            raise IRError(f"unknown dtype {self.name!r}; expected one of {', '.join(DTYPES)}")

    @property
    def is_float(self) -> bool:
        return self.name in FLOAT_DTYPES

    @property
    def is_complex(self) -> bool:
        return self.name in ("c64", "c128")

    def __repr__(self) -> str:
        return f"dtype.{self.name}"

    def __str__(self) -> str:
        return self.name


Dim = Union[int, sympy.Expr]


def sym(name: str) -> sympy.Symbol:
    """The symbol for a dynamic dimension; every dim symbol is a positive integer."""
    return sympy.Symbol(name, integer=True, positive=True)


@dataclass(frozen=True)
class ArgRef:
    """In a fallback node's args/kwargs: "the i-th operand of this node". Printed as arg(i)."""

    index: int

    def __repr__(self) -> str:
        return f"arg({self.index})"


DIM_FUNCS = {"floor": sympy.floor, "ceiling": sympy.ceiling, "Min": sympy.Min, "Max": sympy.Max, "Mod": sympy.Mod,
             # torch's symbolic-shape functions, as a traced size prints them ((-T) % 8 is PythonMod(-T, 8)):
             # on the positive integer sizes they take, sympy's Mod (Python's sign rule) and floor
             "PythonMod": sympy.Mod, "FloorDiv": lambda a, b: sympy.floor(sympy.sympify(a) / b),
             "CleanDiv": lambda a, b: sympy.sympify(a) / b, "FloorToInt": sympy.floor, "CeilToInt": sympy.ceiling}


class DimEval:
    """A restricted evaluator for dimension expressions written as text (``2*T``, ``floor(T/64)``):
    integers, symbols, ``+ - * / // % **`` and the functions in DIM_FUNCS. No arbitrary code runs.
    ir/text.py extends it to the whole literal language of the text format."""

    def __init__(self, where: str):
        self.where = where

    def err(self, node, msg):
        raise ParseError(f"{self.where}: {msg} in {ast.unparse(node)!r}")

    def __call__(self, node):
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            if node.id == "inf":
                return math.inf
            if node.id == "nan":
                return math.nan
            return sym(node.id)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = self(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp):
            a, b = self(node.left), self(node.right)
            ops = {ast.Add: lambda: a + b, ast.Sub: lambda: a - b, ast.Mult: lambda: a * b,
                   ast.FloorDiv: lambda: a // b, ast.Pow: lambda: a ** b, ast.Mod: lambda: a % b,
                   ast.Div: lambda: sympy.Rational(a, b) if isinstance(a, int) and isinstance(b, int)
                   else sympy.sympify(a) / b}
            if type(node.op) in ops:
                return ops[type(node.op)]()
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in DIM_FUNCS:
            return DIM_FUNCS[node.func.id](*[self(a) for a in node.args])
        self.err(node, "unsupported syntax")


def parse_dim(text: str, where: str = "dimension"):
    """A dimension expression written as text, as an int or a sympy expression."""
    try:
        tree = ast.parse(text, mode="eval")
    except SyntaxError as e:
        raise ParseError(f"{where}: cannot parse {text!r}: {e.msg}") from None
    return DimEval(where)(tree.body)


def as_dim(d) -> Dim:
    """Normalise a dim: python/sympy integers become int, anything else stays a sympy expression."""
    if isinstance(d, bool):
        raise IRError(f"a dimension cannot be a bool ({d!r})")
    if isinstance(d, int):
        return d
    if isinstance(d, sympy.Basic):
        d = sympy.simplify(d)
        if d.is_Integer:
            return int(d)
        return d
    if isinstance(d, str):
        return as_dim(parse_dim(d))
    raise IRError(f"a dimension must be an int or a symbolic expression, got {type(d).__name__} {d!r}")


def dims_equal(a: Dim, b: Dim) -> bool:
    """True when two dims are provably equal for every value of their symbols."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a == b:   # the same expression (sympy compares structurally)
        return True
    return _dims_equal(a, b)


@functools.lru_cache(maxsize=4096)
def _dims_equal(a: Dim, b: Dim) -> bool:
    """sympy.simplify is slow (milliseconds) and the recognisers ask the same questions once per layer."""
    return is_zero(sympy.sympify(a) - sympy.sympify(b))


def _period(e) -> int:
    """The least common multiple of the moduli and of the denominators inside floor/ceiling in ``e`` (1: none)."""
    period = 1
    for f in sympy.preorder_traversal(e):
        if isinstance(f, sympy.Mod) and f.args[1].is_Integer:
            period = math.lcm(period, abs(int(f.args[1])))
        elif isinstance(f, (sympy.floor, sympy.ceiling)):
            for c in f.args[0].atoms(sympy.Rational):
                period = math.lcm(period, int(c.q))
    return period


def _cancel_rounded(e):
    """floor/ceiling of a ratio of polynomials, cancelled inside ((8k + 8)/(k + 1) -> 8), innermost first."""
    return e.replace(lambda x: isinstance(x, (sympy.floor, sympy.ceiling)),
                     lambda x: type(x)(sympy.cancel(sympy.expand(x.args[0]))))


def _refuted(d, symbols, period: int) -> bool:
    """Whether ``d`` is nonzero at some small sizes (exact integer evaluation): the cheap half of is_zero."""
    for n in range(1, 2 * period + 2):
        for other in (n, 1, 3):
            v = d.xreplace({s: (n if i == 0 else other) for i, s in enumerate(symbols)})
            if v.is_number and v != 0:
                return True
    return False


@functools.lru_cache(maxsize=4096)
def is_zero(d) -> bool:
    """True when the dimension expression ``d`` is zero for every positive integer value of its symbols. Beyond
    sympy.simplify, an expression with Mod or floor of period p (padding T up to a multiple of a chunk:
    ``T + Mod(7*T, 8)``, ``floor((T + Mod(7*T, 8))/8)``) is proved zero case by case over the residues: each
    symbol written p*k + r (r = 0..p-1, k a new integer symbol), where Mod and floor reduce to polynomials in k."""
    d = sympy.simplify(d)
    if d == 0:
        return True
    symbols = sorted(d.free_symbols, key=str)
    period = _period(d)
    if not symbols or period == 1 or period > 64 or period ** len(symbols) > 256 or _refuted(d, symbols, period):
        return False
    for residues in itertools.product(range(period), repeat=len(symbols)):
        sub = {s: period * sympy.Symbol(f"k_{s}_{r}", integer=True, positive=r == 0, nonnegative=True) + r
               for s, r in zip(symbols, residues)}
        e = d.xreplace(sub)
        for _ in range(3):   # nested floors: cancel, evaluate, again
            e = sympy.expand(_cancel_rounded(e))
            if e == 0:
                break
        if e != 0:
            e = sympy.simplify(e)
        if e != 0:
            return False
    return True


@functools.lru_cache(maxsize=4096)
def folded_dim(d):
    """``d`` itself, or the integer it equals at every size (a chunk count's ``floor((T + Mod(7*T, 8))/floor(...))``
    that is 8 however long T is): proved with is_zero, never assumed from samples."""
    if isinstance(d, int) or not isinstance(d, sympy.Basic) or not d.free_symbols or _period(d) == 1:
        return d
    try:
        value = d.xreplace({s: 37 for s in d.free_symbols})
        if not value.is_Integer or any(d.xreplace({s: n for s in d.free_symbols}) != value for n in (1, 2, 5, 9, 64)):
            return d
        return int(value) if is_zero(d - value) else d
    except (TypeError, ValueError, ZeroDivisionError):
        return d


def eval_dim(d: Dim, binding: Mapping[str, int]) -> int:
    """The concrete size of a dim once every symbol has a value."""
    if isinstance(d, int):
        return d
    missing = [s.name for s in d.free_symbols if s.name not in binding]
    if missing:
        raise IRError(f"dimension {d} uses symbols {missing} that no input binds")
    if not all(isinstance(binding[s.name], int) for s in d.free_symbols):
        return _eval_symbolic(d, binding)   # sizes of a symbolic trace (torch SymInts): stay symbolic
    value = d.subs({s: binding[s.name] for s in d.free_symbols})
    if not value.is_Integer:
        raise IRError(f"dimension {d} is not an integer for {dict(binding)}: {value}")
    return int(value)


def size_fraction(d) -> tuple:
    """(numerator, denominator): integer expressions of the sizes whose quotient is ``d``, a size torch computed as
    a float (``T * 0.5``, ``float(B * T)``: sympy Floats in it), each Float taken as the exact fraction it holds.
    Every backend and export computes such a literal as this quotient."""
    exact = d.xreplace({f: sympy.Rational(f) for f in d.atoms(sympy.Float)})
    num, den = sympy.fraction(sympy.together(exact))
    return sympy.expand(num), sympy.expand(den)


def eval_number(d, binding: Mapping):
    """A literal operand or attribute that is an expression of the sizes: eval_dim where it is integer-valued, the
    quotient of size_fraction where torch computed it as a float (a SymFloat under a symbolic trace)."""
    if not (isinstance(d, sympy.Basic) and d.has(sympy.Float)):
        return eval_dim(d, binding)
    num, den = size_fraction(d)
    return eval_dim(num, binding) / eval_dim(den, binding)


def _eval_symbolic(d, binding: Mapping):
    """eval_dim for bindings holding torch SymInts: the expression is computed with Python arithmetic on the
    values (+, *, exact // for floor and ceiling of a rational multiple), so no size is specialised."""
    def num_den(e):   # e as (numerator value, integer denominator)
        if e.is_Integer:
            return int(e), 1
        if e.is_Rational:
            return int(e.p), int(e.q)
        if e.is_Symbol:
            if e.name not in binding:
                raise IRError(f"dimension {d} uses symbol {e.name} that no input binds")
            return binding[e.name], 1
        if e.is_Add:
            n, q = 0, 1
            for a in e.args:
                an, aq = num_den(a)
                n, q = n * aq + an * q, q * aq
            return n, q
        if e.is_Mul:
            n, q = 1, 1
            for a in e.args:
                an, aq = num_den(a)
                n, q = n * an, q * aq
            return n, q
        if isinstance(e, sympy.floor):
            n, q = num_den(e.args[0])
            return n // q, 1
        if isinstance(e, sympy.ceiling):
            n, q = num_den(e.args[0])
            return -((-n) // q), 1
        raise IRError(f"dimension {d}: cannot evaluate {e} symbolically")

    n, q = num_den(d)
    return n if q == 1 else n // q   # a dim of a well-typed graph is an integer: the division is exact


def format_dim(d: Dim) -> str:
    return str(d).replace(" ", "") if not isinstance(d, int) else str(d)


@dataclass(frozen=True)
class TensorType:
    """The type of an IR value: dtype plus a shape of ints and symbolic dims."""

    dtype: DType
    shape: tuple

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(as_dim(d) for d in self.shape))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def symbols(self) -> set:
        out = set()
        for d in self.shape:
            if not isinstance(d, int):
                out |= {s.name for s in d.free_symbols}
        return out

    def same_as(self, other: "TensorType") -> bool:
        return (
            self.dtype == other.dtype
            and self.rank == other.rank
            and all(dims_equal(a, b) for a, b in zip(self.shape, other.shape))
        )

    def concrete_shape(self, binding: Mapping[str, int]) -> tuple:
        return tuple(eval_dim(d, binding) for d in self.shape)

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(format_dim(d) for d in self.shape)}]"
