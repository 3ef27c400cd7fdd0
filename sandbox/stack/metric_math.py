"""CloudWatch metric math, the part a scaling policy's expression uses, evaluated over series.

`evaluate(expression, series)`: `series` maps each metric id to a time series, one value per
period (None: no datapoint that period); the result is the expression's series. The semantics
are CloudWatch's (Amazon CloudWatch User Guide, "Using metric math"):

- arithmetic `+ - * / ^` between two series treats a missing datapoint of one as 0 (a point
  exists where either has one); with a scalar, a point exists where the series has one; a
  division by zero drops the point;
- comparisons `== != < <= > >=` and `AND`/`&&`, `OR`/`||` give 1 or 0, missing as 0 between
  two series;
- `IF(condition, a[, b])`: no point where the condition has none; where it is true, `a` (0 if
  `a` is a series without a point there); where it is false, `b`, or no point if `b` is
  omitted or a series without a point there;
- `FILL(series, REPEAT | scalar)`: missing points take the last earlier value (REPEAT; none
  before the first) or the scalar.

Anything else (another function, an unknown id) is refused with a ValueError naming it: a
policy's expression the evaluator cannot read is not silently read as something else.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, Optional, Sequence, Union

Series = List[Optional[float]]
Value = Union[float, Series]

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d*)?|\.\d+)|(?P<id>[A-Za-z_][A-Za-z0-9_]*)"
    r"|(?P<op>==|!=|<=|>=|&&|\|\||[-+*/^<>(),]))"
)
_COMPARE: Dict[str, Callable[[float, float], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _tokens(expression: str) -> List[str]:
    out, pos = [], 0
    text = expression.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise ValueError(f"metric math: cannot read {text[pos:]!r} in {expression!r}")
        out.append(m.group(m.lastgroup))
        pos = m.end()
    return out


def _arith(op: str, a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None:
        return None
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if op == "/":
        return None if b == 0 else a / b  # CloudWatch drops a division by zero
    return a**b


def _combine(a: Value, b: Value, fn: Callable[[float, float], Optional[float]]) -> Value:
    if not isinstance(a, list) and not isinstance(b, list):
        return fn(a, b)  # type: ignore[return-value]
    if isinstance(a, list) and isinstance(b, list):
        # two series: a point where either has one, the other's missing point read as 0
        return [
            None
            if x is None and y is None
            else fn(0.0 if x is None else x, 0.0 if y is None else y)
            for x, y in zip(a, b)
        ]
    series, scalar, first = (a, b, True) if isinstance(a, list) else (b, a, False)
    return [
        None if x is None else (fn(x, scalar) if first else fn(scalar, x))  # type: ignore[arg-type]
        for x in series
    ]


class _Parser:
    def __init__(self, expression: str, series: Dict[str, Series]):
        self.expression, self.series = expression, series
        self.tokens, self.pos = _tokens(expression), 0
        lengths = {len(s) for s in series.values()}
        if len(lengths) > 1:
            raise ValueError("metric math: the series differ in length")
        self.n = lengths.pop() if lengths else 0

    def peek(self) -> Optional[str]:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: Optional[str] = None) -> str:
        token = self.peek()
        if token is None or (expected is not None and token.upper() != expected):
            raise ValueError(f"metric math: expected {expected or 'more'} in {self.expression!r}")
        self.pos += 1
        return token

    def parse(self) -> Value:
        value = self.logical()
        if self.peek() is not None:
            raise ValueError(f"metric math: unexpected {self.peek()!r} in {self.expression!r}")
        return value

    def logical(self) -> Value:
        value = self.comparison()
        while (self.peek() or "").upper() in ("AND", "&&", "OR", "||"):
            op = self.take().upper()
            right = self.comparison()
            both = op in ("AND", "&&")
            value = _combine(
                value,
                right,
                lambda a, b, both=both: float(bool(a) and bool(b) if both else bool(a) or bool(b)),
            )
        return value

    def comparison(self) -> Value:
        value = self.additive()
        while self.peek() in _COMPARE:
            test = _COMPARE[self.take()]
            right = self.additive()
            value = _combine(value, right, lambda a, b, t=test: float(t(a, b)))
        return value

    def additive(self) -> Value:
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            value = _combine(value, self.term(), lambda a, b, op=op: _arith(op, a, b))
        return value

    def term(self) -> Value:
        value = self.power()
        while self.peek() in ("*", "/"):
            op = self.take()
            value = _combine(value, self.power(), lambda a, b, op=op: _arith(op, a, b))
        return value

    def power(self) -> Value:
        value = self.unary()
        if self.peek() == "^":
            self.take()
            value = _combine(value, self.power(), lambda a, b: _arith("^", a, b))
        return value

    def unary(self) -> Value:
        if self.peek() == "-":
            self.take()
            return _combine(-1.0, self.unary(), lambda a, b: a * b)
        return self.atom()

    def atom(self) -> Value:
        token = self.take()
        if token == "(":
            value = self.logical()
            self.take(")")
            return value
        if re.fullmatch(r"\d+(?:\.\d*)?|\.\d+", token):
            return float(token)
        if token.upper() in ("IF", "FILL") and self.peek() == "(":
            return self.function(token.upper())
        if token in self.series:
            return list(self.series[token])
        raise ValueError(f"metric math: {token!r} is not a metric id nor a function this reads")

    def arguments(self) -> List[Value]:
        self.take("(")
        args = [self.logical()]
        while self.peek() == ",":
            self.take()
            if self.peek() is not None and self.peek().upper() == "REPEAT":
                self.take()
                args.append("REPEAT")  # type: ignore[arg-type]
            else:
                args.append(self.logical())
        self.take(")")
        return args

    def function(self, name: str) -> Value:
        args = self.arguments()
        if name == "IF":
            return _if(args, self.n, self.expression)
        return _fill(args, self.expression)


def _at(value: Value, i: int) -> Optional[float]:
    return value[i] if isinstance(value, list) else value


def _if(args: Sequence[Value], n: int, expression: str) -> Series:
    if len(args) not in (2, 3):
        raise ValueError(f"metric math: IF takes 2 or 3 arguments in {expression!r}")
    cond, yes = args[0], args[1]
    no = args[2] if len(args) == 3 else None
    out: Series = []
    for i in range(n):
        c = _at(cond, i)
        if c is None:
            out.append(None)
        elif c:
            y = _at(yes, i)
            out.append(0.0 if y is None else y)
        else:
            out.append(None if no is None else _at(no, i))
    return out


def _fill(args: Sequence[Value], expression: str) -> Series:
    if len(args) != 2 or not isinstance(args[0], list):
        raise ValueError(f"metric math: FILL takes a series and a filler in {expression!r}")
    series, filler = args[0], args[1]
    out: Series = []
    last: Optional[float] = None
    for x in series:
        if x is not None:
            last = x
            out.append(x)
        elif filler == "REPEAT":
            out.append(last)
        else:
            out.append(_at(filler, len(out)))  # type: ignore[arg-type]
    return out


def evaluate(expression: str, series: Dict[str, Series]) -> Series:
    """The expression's series over `series` ({metric id: one value or None per period})."""
    parser = _Parser(expression, series)
    value = parser.parse()
    if not isinstance(value, list):
        raise ValueError(f"metric math: {expression!r} gives a scalar, not a time series")
    return [None if v is None or math.isnan(v) else v for v in value]
