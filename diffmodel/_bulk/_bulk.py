"""Prediction at scale: millions of steps, chunked, validated once, on many devices.

:func:`predict_steps` evaluates :func:`diffmodel.step_time` over arrays of steps from
several deployments with one compiled function of a fixed chunk shape; the inputs are
validated once (shapes and groups in NumPy, values inside the compiled loop, which
reads them anyway), and the hot loop runs without ``step_time``'s checks.
:func:`predict_requests` does the same from padded per-request batches, and
:func:`predict_frame_fast` from a pandas frame.

Rewrites make the compiled function fast on CPU without changing its value beyond
rounding:

- arithmetic on deployment values runs once per group, and sums of statistics times
  deployment constants are combined per group before they meet the steps (see
  :class:`_Evaluator`, :class:`_Affine`): about half the per-step operations go;
- per-step deployment values are picked from the (few) groups with a chain of
  ``where`` rather than a gather, so XLA fuses the whole step into one loop;
- ``pow`` is rewritten as multiplications and square roots for the constant
  exponents of the smooth maximum (``a^4``, ``s^(1/4)``) and as ``exp(y log x)``
  otherwise (the MoE expert count): XLA:CPU evaluates ``pow`` ~10x slower than ``exp``.
"""

import collections
import functools
from collections.abc import Sequence

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import ArrayLike

from .._frame import groups_from_frame, stats_from_frame
from .._model._batch import BatchStats, request_terms
from .._model._deployment import Deployment, stack_deployments
from .._model._factors import FACTOR_NAMES, Factors, default_factors
from .._model._roofline import COMPONENTS, step_time, step_total

STAT_FIELDS: tuple[str, ...] = tuple(BatchStats.__dataclass_fields__)

# Up to this many groups, per-step deployment values are chosen by a ``where`` chain
# (fuses into the elementwise loop); beyond it, by a gather.
_SELECT_MAX_GROUPS = 8
# Host buffers handed to XLA:CPU without a copy must be 64-byte aligned; chunk lengths
# are multiples of this many elements so that chunk starts stay aligned.
_ALIGN_BYTES = 64
_ALIGN_ELEMS = 16
# Chunks dispatched ahead of the one being copied out (see _run_chunks).
_IN_FLIGHT = 3
# Staging buffers the feeder cycles through: one per chunk that may be in flight
# while the next is staged (see _Feeder).
_N_STAGING = _IN_FLIGHT + 1


# pow rewrite


def _pow(x, y):
    """``x ** y`` without XLA's ``pow``: the same value up to rounding.

    Constant exponents 1, 2, 4, 1/2, 1/4 become multiplications and square roots;
    others ``exp(y log|x|)`` with the signs and zeros of ``pow`` restored for finite
    inputs (``x^0 = 1``; a negative base needs an integer exponent, else NaN).
    """
    if not isinstance(y, jax.core.Tracer) and np.size(y) == 1:
        c = float(np.asarray(y))
        if c == 1.0:
            return x * jnp.ones_like(jnp.asarray(y))
        if c == 2.0:
            return x * x
        if c == 4.0:
            x2 = x * x
            return x2 * x2
        if c == 0.5:
            return jnp.sqrt(x)
        if c == 0.25:
            return jnp.sqrt(jnp.sqrt(x))
    x, y = jnp.asarray(x), jnp.asarray(y)
    r = jnp.exp(y * jnp.log(jnp.abs(x)))
    r = jnp.where(y == 0, jnp.ones_like(r), r)
    y_int = y == jnp.round(y)
    odd = y_int & (jnp.fmod(y, 2.0) != 0)
    neg = jnp.where(y_int, jnp.where(odd, -r, r), jnp.full_like(r, jnp.nan))
    return jnp.where(x < 0, neg, r)


class _PerGroup:
    """A value that depends on the deployment group only: one entry per group."""

    __slots__ = ("table",)

    def __init__(self, table):
        self.table = table


class _Affine:
    """``const + sum(base * coef)``: per-step bases with per-group (or constant)
    coefficients, kept apart until something else needs the value.

    The work of a step is mostly sums of per-step statistics times deployment
    constants (the FLOPs and bytes of each GEMM, ``w + T c``); kept in this form,
    ``(x a) b / c``, ``x a + x b`` and ``(w1 + x a1) + (w2 + x a2)`` combine their
    coefficients per group, and only the combined tables meet the steps: a
    ``where`` chain and a multiply per distinct base instead of one per term. This
    reassociates, so results move by a few roundings.

    Attributes:
        const: per-group (:class:`_PerGroup`) or scalar constant term, or ``None``.
        terms: ``(base, coef)`` pairs with distinct per-step ``base`` arrays (by
            identity) and per-group or scalar ``coef`` (the float ``1.0`` when
            unscaled).
        aval: shape and dtype of the value.
    """

    __slots__ = ("const", "terms", "aval")

    def __init__(self, const, terms, aval):
        self.const, self.terms, self.aval = const, tuple(terms), aval


# Elementwise primitives: applied to per-group tables when no input varies per step.
_ELEMENTWISE = frozenset(
    "abs add and ceil convert_element_type div eq exp exp2 expm1 floor ge gt "
    "integer_pow is_finite le log log1p lt max min mul ne neg not or pow rem round "
    "rsqrt select_n sign sqrt square sub".split()
)


def _is_one(c) -> bool:
    """The unscaled coefficient marker (the Python float ``1.0``)."""
    return isinstance(c, float) and c == 1.0


def _is_affine(x) -> bool:
    return isinstance(x, _Affine)


class _Evaluator:
    """Evaluates a jaxpr of per-step arrays with rewrites that keep its value.

    - Hoisting: inputs given as :class:`_PerGroup` (deployment values and per-group
      factors) stay ``[groups]`` tables through every elementwise operation that sees
      no per-step value, so the arithmetic on architecture and hardware numbers runs
      once per group, not once per step; a table meets the steps (``where`` chain, or
      a gather beyond a few groups) only where it is combined with them.
    - Affine folding: multiplying or dividing by a table or constant, and adding
      such products, builds an :class:`_Affine` (coefficients combined per group),
      materialised once where another operation needs the per-step value.
      A per-step value divided by a per-group one is thereby multiplied by the
      reciprocal (one rounding more).
    - ``pow`` on per-step values goes through :func:`_pow`.
    """

    def __init__(self, group, n_groups: int, tables=None):
        self.group, self.n_groups = group, n_groups
        self.expanded: dict[int, object] = {}
        # The tables that meet the steps, in order of first use: collected, or (in a
        # second evaluation of the same jaxpr) supplied precomputed, as distinct
        # tables and a plan (see :func:`_table_plan`).
        self.collected: list = []
        self.supplied = tables
        self.spread: dict[int, object] = {}

    def per_step(self, value, aval):
        if isinstance(value, _Affine):
            key = id(value)
            if key not in self.expanded:
                out = None
                for base, coef in value.terms:
                    term = base if _is_one(coef) else base * self.per_step(coef, aval)
                    out = term if out is None else out + term
                if value.const is not None:
                    out = out + self.per_step(value.const, aval)
                self.expanded[key] = (value, out)
            return self.expanded[key][1]
        if not isinstance(value, _PerGroup):
            return value
        key = id(value)
        if key not in self.expanded:
            if self.supplied is None:
                out = self.spread_table(value.table)
            else:
                distinct, plan = self.supplied
                same, j = plan[len(self.collected)]
                if same:  # one value for all groups: no per-step choice
                    out = distinct[j][0]
                elif j in self.spread:  # equal to an earlier table: reuse its choice
                    out = self.spread[j]
                else:
                    out = self.spread[j] = self.spread_table(distinct[j])
            self.collected.append(value.table)
            self.expanded[key] = (value, jnp.broadcast_to(out, aval.shape))
        return self.expanded[key][1]

    def spread_table(self, t):
        """Each step's entry of the ``[groups]`` table ``t``."""
        if self.n_groups == 1:
            return t[0]
        if self.n_groups <= _SELECT_MAX_GROUPS:
            out = t[0]
            for g in range(1, self.n_groups):
                out = jnp.where(self.group == g, t[g], out)
            return out
        return jnp.take(t, self.group, axis=0, mode="clip")  # range checked before

    def table(self, value, aval):
        if isinstance(value, _PerGroup):
            return value.table
        return jnp.full((self.n_groups,), value, dtype=aval.dtype)

    def combine(self, op, a, b, aval):
        """``op`` of two factors (per group or constant): once, not per step."""
        if isinstance(a, _PerGroup) or isinstance(b, _PerGroup):
            return _PerGroup(op(self.table(a, aval), self.table(b, aval)))
        return op(jnp.asarray(a, aval.dtype), jnp.asarray(b, aval.dtype))

    def fold(self, name, invals, avals, out):
        """``mul``/``div`` by a factor, or ``add``/``sub`` of affine values: an
        :class:`_Affine` (``None`` where the operation is not of that kind)."""
        if not out.shape or not jnp.issubdtype(out.dtype, jnp.floating):
            return None

        def factor(x, a):  # per group, or one number for all steps
            return isinstance(x, _PerGroup) or (not a.shape and not _is_affine(x))

        def affine(x, a):
            if isinstance(x, _Affine):
                return x
            if factor(x, a):
                return _Affine(x, (), out)
            if a.shape == out.shape:
                return _Affine(None, ((x, 1.0),), out)
            return None

        (x, y), (ax, ay) = invals, avals
        if factor(x, ax) and factor(y, ay):
            return None  # per-group arithmetic, or a scalar: not per step
        if name == "mul" and factor(x, ax):
            x, y, ax, ay = y, x, ay, ax
        if name in ("mul", "div"):
            if not factor(y, ay) or (fx := affine(x, ax)) is None:
                return None
            op = jnp.multiply if name == "mul" else jnp.divide
            return self.scale(fx, y, op, out)
        if name in ("add", "sub"):
            if not (_is_affine(x) or _is_affine(y) or factor(x, ax) or factor(y, ay)):
                return None  # a sum of statistics stays one array (one base)
            fx, fy = affine(x, ax), affine(y, ay)
            if fx is None or fy is None:
                return None
            if name == "sub":
                fy = self.scale(fy, -1.0, jnp.multiply, out)
            return self.add(fx, fy, out)
        return None

    def scale(self, f: _Affine, y, op, out) -> _Affine:
        """``op(f, y)`` for ``op`` multiply or divide by the factor ``y``."""

        def coef(c):
            if _is_one(c) and op is jnp.multiply:
                return y
            return self.combine(op, c, y, out)

        const = None if f.const is None else self.combine(op, f.const, y, out)
        return _Affine(const, [(b, coef(c)) for b, c in f.terms], out)

    def add(self, f: _Affine, g: _Affine, out) -> _Affine:
        """``f + g``: constants added, coefficients of the same base added."""
        if f.const is None or g.const is None:
            const = g.const if f.const is None else f.const
        else:
            const = self.combine(jnp.add, f.const, g.const, out)
        terms = dict((id(b), [b, c]) for b, c in f.terms)
        for b, c in g.terms:
            if id(b) in terms:
                terms[id(b)][1] = self.combine(jnp.add, terms[id(b)][1], c, out)
            else:
                terms[id(b)] = [b, c]
        return _Affine(const, [tuple(t) for t in terms.values()], out)

    def eval(self, jaxpr: jex.Jaxpr, consts, args, *, top: bool = True) -> list:
        """The outputs of ``jaxpr``: per-step arrays at the top level; a nested
        jaxpr (``top=False``) returns its values as they are (tables stay tables)."""
        env = {}

        def read(v):
            return v.val if isinstance(v, jex.Literal) else env[v]

        def write(v, val):
            if not isinstance(v, jex.DropVar):
                env[v] = val

        for v, val in zip(jaxpr.constvars, consts, strict=True):
            write(v, val)
        for v, val in zip(jaxpr.invars, args, strict=True):
            write(v, val)
        for eqn in jaxpr.eqns:
            invals = [read(v) for v in eqn.invars]
            avals = [v.aval for v in eqn.invars]
            name = eqn.primitive.name
            grouped = [isinstance(x, _PerGroup) for x in invals]
            if name in ("pjit", "jit") and "jaxpr" in eqn.params:
                sub = eqn.params["jaxpr"]
                outvals = self.eval(sub.jaxpr, sub.consts, invals, top=False)
            elif (
                name == "broadcast_in_dim"
                and not avals[0].shape
                and not _is_affine(invals[0])
                and len(eqn.outvars[0].aval.shape) == 1
            ):
                # A constant spread over the steps (``jnp.where(c, x, 1.0)`` does
                # this to its scalar): the same number for every group, so that the
                # operations it meets stay per group.
                x = invals[0]
                outvals = [_PerGroup(jnp.full((self.n_groups,), x, avals[0].dtype))]
            elif (
                any(grouped)
                and name in _ELEMENTWISE
                and all(g or not a.shape for g, a in zip(grouped, avals, strict=True))
            ):
                tables = [self.table(x, a) for x, a in zip(invals, avals, strict=True)]
                outvals = [_PerGroup(self.bind(eqn, tables)[0])]
            elif name in ("mul", "div", "add", "sub") and (
                folded := self.fold(name, invals, avals, eqn.outvars[0].aval)
            ):
                outvals = [folded]
            else:
                invals = [
                    self.per_step(x, a) for x, a in zip(invals, avals, strict=True)
                ]
                if name == "pow":
                    outvals = [_pow(*invals)]
                else:
                    outvals = self.bind(eqn, invals)
            for v, val in zip(eqn.outvars, outvals, strict=True):
                write(v, val)
        if not top:
            return [read(v) for v in jaxpr.outvars]
        return [self.per_step(read(v), v.aval) for v in jaxpr.outvars]

    @staticmethod
    def bind(eqn, invals) -> list:
        bind = eqn.primitive.get_bind_params(eqn.params)
        # Older JAX returns (subfuns, params); newer returns params only.
        subfuns, params = bind if isinstance(bind, tuple) else ((), bind)
        out = eqn.primitive.bind(*subfuns, *invals, **params)
        return out if eqn.primitive.multiple_results else [out]


def _total_and_parts(stats, dep, fac, components):
    dtype = stats.prefill_tokens.dtype
    if not components:  # inputs validated at the boundary
        return step_total(stats, dep, fac, check=False).astype(dtype)
    b = step_time(stats, dep, fac, check=False)
    total = b.total.astype(dtype)
    return total, {c: getattr(b, c).astype(total.dtype) for c in COMPONENTS}


def _evaluate(stats, deployments, group, factors, components, tables=None):
    """Evaluate the step model with :class:`_Evaluator`: (outputs, tables used)."""
    n_groups = int(jnp.shape(deployments.tp)[0])
    shape = jnp.shape(stats.prefill_tokens)

    def step_shaped(x):
        if jnp.ndim(x) == 0:
            return x
        return jax.ShapeDtypeStruct(shape, jnp.result_type(x))

    # Traced from shapes alone, so that the jaxpr (and the order in which it uses
    # the tables) does not depend on where the inputs live (sharded or not).
    closed, out_shape = jax.make_jaxpr(
        functools.partial(_total_and_parts, components=components), return_shape=True
    )(
        jax.tree.map(step_shaped, stats),
        jax.tree.map(step_shaped, deployments),
        jax.tree.map(step_shaped, factors),
    )

    def wrap(x):
        return x if jnp.ndim(x) == 0 else _PerGroup(jnp.asarray(x))

    args = [
        *jax.tree.leaves(stats),
        *map(wrap, jax.tree.leaves(deployments)),
        *map(wrap, jax.tree.leaves(factors)),
    ]
    ev = _Evaluator(group, n_groups, tables)
    out = ev.eval(closed.jaxpr, closed.consts, args)
    return jax.tree.unflatten(jax.tree.structure(out_shape), out), ev.collected


def step_time_fast(
    stats: BatchStats,
    deployments: Deployment,
    group,
    factors: Factors,
    *,
    components: bool = False,
):
    """Total step time of many steps, us: :func:`diffmodel.step_time_batch`, faster.

    The value of ``step_time_batch(stats, deployments, group, factors,
    check=False).total`` (to rounding), traceable and differentiable, for use inside
    ``jit``/``grad`` on validated inputs (it does not check them: see
    :func:`predict_steps`). Deployment arithmetic runs per group and ``pow`` is
    avoided (see :class:`_Evaluator`).

    Args:
        stats: 1-D statistics of ``steps`` entries; ``deployments`` stacked over
            groups; ``group`` each step's group (int, in range); ``factors`` shared
            (scalar fields) or per group (leading axis = groups).
        components: also return the components, as a dict.
    """
    return _evaluate(stats, deployments, group, factors, components)[0]


@functools.partial(jax.jit, static_argnames=("components", "dtype"))
def _group_tables(deployments, factors, *, components, dtype):
    """The per-group tables the step loop reads, each ``[groups]``.

    Computed once per call, outside the step loop: inside one XLA computation the
    compiler fuses this tiny arithmetic into the loop and redoes it for every step.
    """
    # Distinct arrays, as in the chunks: :class:`_Affine` merges terms by identity.
    stats = BatchStats(*(jnp.full(_ALIGN_ELEMS, i, dtype) for i in range(7)))
    group = jnp.zeros(_ALIGN_ELEMS, jnp.int32)
    _, tables = _evaluate(stats, deployments, group, factors, components)
    return tuple(tables)


def _table_plan(tables) -> tuple[tuple, tuple]:
    """Distinct tables and, per table, ``(same for all groups, index into them)``.

    With the values in hand (a few numbers per group), tables equal to an earlier one
    share its per-step choice and tables equal across groups (the same hardware,
    shared factors, zeros of a dense model) need none: about half of the ``where``
    selections of a typical mix go. The plan is static, so it is compiled in; it
    changes only with the pattern of equal values, not with the values.
    """
    host = [np.asarray(t) for t in tables]
    distinct, plan, seen = [], [], {}
    for t, h in zip(tables, host, strict=True):
        key = (h.dtype.str, h.tobytes())
        if key not in seen:
            seen[key] = len(distinct)
            distinct.append(t)
        plan.append((bool(np.all(h == h[0])), seen[key]))
    return tuple(distinct), tuple(plan)


def _stats_kernel(cols, group, tables, deployments, factors, components):
    stats = BatchStats(*cols)
    out = _evaluate(stats, deployments, group, factors, components, tables)[0]
    # The value check, fused into the loop that reads the statistics anyway: a step
    # with a negative or NaN statistic gets a NaN total (named afterwards, in NumPy).
    # Comparisons and ``and`` rather than a NaN-propagating minimum, which XLA:CPU
    # expands into several instructions (``NaN >= 0`` is false).
    ok = functools.reduce(jnp.logical_and, [c >= 0 for c in cols])
    total = out[0] if components else out
    total = jnp.where(ok, total, jnp.full_like(total, jnp.nan))
    return (total, out[1]) if components else total


def _requests_kernel(cols, group, tables, deployments, factors, components):
    new, ctx, mask = cols
    stats = _sum_requests(request_terms(new, ctx, mask))
    stats = jax.tree.map(lambda x: x.astype(new.dtype), stats)  # float64 under x64
    return _evaluate(stats, deployments, group, factors, components, tables)[0]


@functools.partial(jax.jit, static_argnames=("kernel", "plan", "shapes", "components"))
def _chunk(
    windows, offsets, tables, deployments, factors, *, kernel, plan, shapes, components
):
    """One chunk: ``kernel`` on the arrays of ``shapes`` found in ``windows``.

    A window is either the array itself or a flat run of its elements that starts at
    a 64-byte boundary at or before it, the array beginning ``offsets[k]`` elements
    in: that lets XLA:CPU read a misaligned host array without a copy (see
    :class:`_Feeder`).
    """
    arrays = []
    for k, (w, shape) in enumerate(zip(windows, shapes, strict=True)):
        if w.shape != shape:
            size = int(np.prod(shape))
            w = jax.lax.dynamic_slice(w, (offsets[k],), (size,)).reshape(shape)
        arrays.append(w)
    *cols, group = arrays
    tables = (tables, plan)
    return kernel(tuple(cols), group, tables, deployments, factors, components)


def _sum_requests(terms) -> BatchStats:
    """:func:`diffmodel.from_requests`'s sums over the request axis, in one pass.

    One variadic reduction: XLA:CPU fuses the per-slot terms into a single loop over
    the slots that keeps all seven sums in registers, where seven separate sums
    (each a reduction over the minor axis) re-read the inputs and run ~8x slower.
    """
    zeros = tuple(jnp.zeros((), x.dtype) for x in terms)
    sums = jax.lax.reduce(
        tuple(terms),
        zeros,
        lambda a, b: tuple(x + y for x, y in zip(a, b, strict=True)),
        (terms[0].ndim - 1,),
    )
    return BatchStats(*sums)


# boundary validation


def _float_dtype(dtype) -> np.dtype:
    dt = np.dtype(dtype)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    if dt == np.float64 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            "dtype=float64 needs 64-bit JAX: call "
            "jax.config.update('jax_enable_x64', True) before using diffmodel"
        )
    return dt


def _check_values(name: str, x: np.ndarray, unit: str) -> None:
    """Raise ``ValueError`` naming ``name`` if a value is negative or NaN."""
    if x.size == 0:
        return
    # NaN propagates through min: one pass catches NaN and negative values alike.
    if not (x.min() >= 0):
        bad = np.flatnonzero(~(x >= 0))
        where = tuple(int(i) for i in np.unravel_index(int(bad[0]), x.shape))
        at = where[0] if len(where) == 1 else where
        raise ValueError(
            f"{name} must be >= 0 and not NaN ({unit}); index {at} has {x[where]}"
        )


def _as_array(name: str, x, ndim: int, kind: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {a.shape}")
    if kind == "f" and a.dtype.kind not in "fiu":
        raise ValueError(f"{name} must be numeric, got dtype {a.dtype}")
    if kind == "i" and a.dtype.kind not in "iu":
        raise ValueError(f"{name} must be an integer array, got dtype {a.dtype}")
    if kind == "b" and a.dtype.kind != "b":
        raise ValueError(f"{name} must be a boolean array, got dtype {a.dtype}")
    return a


def _check_out(out, n: int, dtype: np.dtype, components: bool) -> np.ndarray | None:
    """``out`` checked as a destination for ``n`` totals of ``dtype``."""
    if out is None:
        return None
    if components:
        raise ValueError(
            "out is for the totals only: it cannot be used with components"
        )
    if not isinstance(out, np.ndarray):
        raise ValueError(f"out must be a NumPy array, got {type(out).__name__}")
    if out.shape != (n,) or out.dtype != dtype:
        raise ValueError(
            f"out must have shape ({n},) and dtype {dtype}, got shape {out.shape} "
            f"and dtype {out.dtype}"
        )
    if not (out.flags.c_contiguous and out.flags.writeable):
        raise ValueError("out must be C-contiguous and writeable")
    return out


def _check_group(group, n: int, n_groups: int) -> np.ndarray:
    g = _as_array("group", group, 1, "i")
    if g.shape[0] != n:
        raise ValueError(f"group must have one entry per step ({n}), got {g.shape[0]}")
    g = np.ascontiguousarray(g, dtype=np.int32) if g.dtype != np.int32 else g
    # Negative int32 values become huge as uint32: one pass checks both bounds.
    if n and int(g.view(np.uint32).max()) >= n_groups:
        i = int(np.flatnonzero((g < 0) | (g >= n_groups))[0])
        raise ValueError(
            f"group must index the {n_groups} deployment(s), in [0, {n_groups}); "
            f"step {i} has {int(g[i])}"
        )
    return g


def _resolve(deployments, factors, dtype) -> tuple[Deployment, Factors, int]:
    if not isinstance(deployments, Deployment):
        raise ValueError(
            "deployments must be a diffmodel.Deployment (see diffmodel.deployment and "
            f"diffmodel.stack_deployments), got {type(deployments).__name__}"
        )
    if jnp.ndim(deployments.tp) == 0:
        deployments = stack_deployments([deployments])
    if jnp.ndim(deployments.tp) != 1:
        raise ValueError(
            "deployments must be stacked along one leading (group) axis, got tp shape "
            f"{jnp.shape(deployments.tp)}"
        )
    n_groups = int(jnp.shape(deployments.tp)[0])
    factors = default_factors() if factors is None else factors
    if not isinstance(factors, Factors):
        raise ValueError(
            f"factors must be None or a diffmodel.Factors, got {type(factors).__name__}"
        )
    for name in FACTOR_NAMES:
        shape = jnp.shape(getattr(factors, name))
        if shape not in ((), (n_groups,)):
            raise ValueError(
                f"factors.{name} must be a scalar (shared) or one value per group "
                f"(shape ({n_groups},)), got shape {shape}"
            )
    cast = functools.partial(jax.tree.map, lambda x: np.asarray(x, dtype))
    return cast(deployments), cast(factors), n_groups


# chunked engine


def _resolve_devices(devices) -> list:
    if devices is None:
        return list(jax.devices())
    devices = list(devices) if isinstance(devices, Sequence) else [devices]
    if not devices:
        raise ValueError("devices must name at least one device")
    return devices


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _chunk_len(n: int, chunk_size: int | None, multiple: int) -> int:
    """Fixed chunk length: ``chunk_size`` (or ``n``), never far above ``n``."""
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None: {chunk_size}")
    want = max(n, 1) if chunk_size is None else min(int(chunk_size), max(n, 1))
    if chunk_size is not None and want < chunk_size:
        # Short inputs: the next power of two, so few shapes are ever compiled.
        want = 1 << (want - 1).bit_length()
    return _round_up(want, multiple)


def _address(a: np.ndarray) -> int:
    return a.__array_interface__["data"][0]  # ~100x cheaper than ``a.ctypes.data``


def _aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + _ALIGN_BYTES, np.uint8)
    off = (-_address(raw)) % _ALIGN_BYTES
    return raw[off : off + nbytes].view(dtype).reshape(shape)


class _Feeder:
    """Hands chunks of host arrays to devices, without a copy where possible.

    XLA:CPU reads a host buffer in place (``jax.device_put`` aliases it) only if it
    starts at a 64-byte boundary; NumPy's own arrays usually start 16 bytes past one.
    On one device, chunk ``k`` of a contiguous array of the right dtype therefore goes
    as a *window*: a flat run of its elements from the boundary at or before the
    chunk, ``chunk + pad`` long, with the chunk's offset into it, sliced out inside
    the compiled function. Where no such window lies inside the array (the first
    chunk of a misaligned array, the last, padded chunk), and for strided arrays,
    other dtypes, or several devices (a window would straddle shards), the chunk is
    copied into one of ``_IN_FLIGHT + 1`` reused aligned staging buffers. XLA reads
    a staged buffer in place and asynchronously, so a buffer may be refilled only
    once the chunk it held has been collected: chunk ``i`` is staged while chunks
    ``i - _IN_FLIGHT .. i - 1`` may still be computing, hence one buffer more than
    chunks in flight.
    """

    def __init__(self, arrays, dtypes, chunk: int, sharding, pad_values, windows):
        self.arrays, self.dtypes, self.chunk = arrays, dtypes, chunk
        self.sharding, self.pad_values = sharding, pad_values
        self.windows = windows
        self.shapes = tuple((chunk, *a.shape[1:]) for a in arrays)
        self.flat = []
        for a, dt in zip(arrays, dtypes, strict=True):
            ok = a.dtype == dt and a.flags.c_contiguous
            ok = ok and _address(a) % a.itemsize == 0
            self.flat.append(a.reshape(-1) if ok else None)
        self.pad = [
            _ALIGN_BYTES // np.dtype(dt).itemsize if windows else 0 for dt in dtypes
        ]
        self.window_shapes = tuple(
            (int(np.prod(s)) + p,) if windows else s
            for s, p in zip(self.shapes, self.pad, strict=True)
        )
        self.staging = [
            [
                _aligned_empty(s, dt)
                for s, dt in zip(self.window_shapes, dtypes, strict=True)
            ]
            for _ in range(_N_STAGING)
        ]

    def __call__(self, i: int, start: int) -> tuple[list, np.ndarray]:
        out, offsets = [], np.zeros(len(self.arrays), np.int32)
        for k, (a, flat) in enumerate(zip(self.arrays, self.flat, strict=True)):
            part = self._window(k, a, flat, start, offsets)
            if part is None:
                buf = self.staging[i % _N_STAGING][k]
                rows = a[start : start + self.chunk]
                m = rows.size
                view = buf.reshape(-1)
                view[:m] = rows.reshape(-1)
                view[m:] = self.pad_values[k]
                part = buf
            # On one device the jitted call takes NumPy arrays as they are (in place
            # when aligned): ~10x less overhead per chunk than jax.device_put.
            out.append(part if self.windows else jax.device_put(part, self.sharding))
        return out, offsets

    def _window(self, k, a, flat, start, offsets):
        if flat is None:
            return None
        if not self.windows:  # several devices: the chunk itself, if aligned
            part = a[start : start + self.chunk]
            whole = part.shape[0] == self.chunk
            return part if whole and _address(part) % _ALIGN_BYTES == 0 else None
        size = self.window_shapes[k][0] - self.pad[k]
        lo = start * (size // self.chunk)
        off = ((_address(flat) + lo * a.itemsize) % _ALIGN_BYTES) // a.itemsize
        first, stop = lo - off, lo - off + size + self.pad[k]
        if first < 0 or stop > flat.size:
            return None
        offsets[k] = off
        return flat[first:stop]


def _run_chunks(
    kernel,
    arrays,
    dtypes,
    pad_values,
    group,
    n: int,
    steps_per_chunk: int | None,
    *,
    out_dtype,
    deployments,
    factors,
    components: bool,
    devices,
    on_nan=None,
    out=None,
):
    devices = _resolve_devices(devices)
    if len(devices) > 1:
        mesh = Mesh(np.asarray(devices), ("steps",))
        sharding = NamedSharding(mesh, PartitionSpec("steps"))
        replicated = NamedSharding(mesh, PartitionSpec())
    else:
        sharding = replicated = devices[0]
    chunk = _chunk_len(n, steps_per_chunk, _ALIGN_ELEMS * len(devices))
    deployments = jax.device_put(deployments, replicated)
    factors = jax.device_put(factors, replicated)
    tables = _group_tables(
        deployments, factors, components=components, dtype=np.dtype(out_dtype)
    )
    feeder = _Feeder(
        [*arrays, group],
        [*dtypes, np.int32],
        chunk,
        sharding,
        [*pad_values, 0],
        windows=len(devices) == 1,
    )
    tables, plan = _table_plan(tables)
    fn = functools.partial(
        _chunk, kernel=kernel, plan=plan, shapes=feeder.shapes, components=components
    )
    names = ("total", *COMPONENTS) if components else ("total",)
    outs = {k: np.empty(n, out_dtype) for k in names} if out is None else {"total": out}
    nan = [False]

    def collect(start, result):
        stop = min(start + chunk, n)
        parts = {"total": result[0], **result[1]} if components else {"total": result}
        for k in names:
            outs[k][start:stop] = np.asarray(parts[k])[: stop - start]
        # A sum is NaN if any term is (or +inf meets -inf): one read, in cache.
        nan[0] = nan[0] or bool(np.isnan(np.sum(outs["total"][start:stop])))

    # Keep ``_IN_FLIGHT`` chunks dispatched: XLA:CPU runs independent executions
    # on its thread pool, so with two in flight both cores compute while the host
    # copies finished results out.
    pending: collections.deque = collections.deque()
    for i, start in enumerate(range(0, n, chunk)):
        windows, offsets = feeder(i, start)
        pending.append(
            (start, fn(tuple(windows), offsets, tables, deployments, factors))
        )
        if len(pending) > _IN_FLIGHT:
            collect(*pending.popleft())
    while pending:
        collect(*pending.popleft())
    if nan[0] and on_nan is not None:
        on_nan()
    return outs if components else outs["total"]


# entries


def predict_steps(
    stats: BatchStats,
    deployments: Deployment,
    group: ArrayLike,
    factors: Factors | None = None,
    *,
    chunk_size: int | None = 2**18,
    dtype=jnp.float32,
    components: bool = False,
    devices=None,
    out: np.ndarray | None = None,
) -> np.ndarray | dict[str, np.ndarray]:
    """Step time of many steps, microseconds per GPU, as NumPy arrays.

    The values of :func:`diffmodel.step_time_batch`, for inputs too large to evaluate
    in one piece: the steps are cut into chunks of ``chunk_size`` (the last one padded
    with empty steps), so one compiled function serves every chunk and the device
    memory in use stays near one chunk's worth; results go into one preallocated
    output array.

    Args:
        stats: :class:`diffmodel.BatchStats` with 1-D fields of ``steps`` entries
            (tokens, requests, token pairs), finite and ``>= 0``.
        deployments: stacked deployments (:func:`diffmodel.stack_deployments`, or one
            unstacked :class:`diffmodel.Deployment`).
        group: each step's deployment, integers in ``[0, groups)``.
        factors: ``None`` (physical priors) or :class:`diffmodel.Factors`, shared
            (scalar fields) or per group (fields of shape ``(groups,)``).
        chunk_size: steps per compiled call (rounded up to a multiple of 16 times the
            number of devices); ``None`` evaluates all steps in one call.
        dtype: ``float32`` (default) or ``float64`` (needs ``jax_enable_x64``).
        components: also return each :data:`diffmodel.COMPONENTS` term.
        devices: devices to split each chunk's steps over (default ``jax.devices()``;
            with more than one, chunks are sharded over a 1-D mesh).
        out: a writeable, C-contiguous NumPy array of ``steps`` entries of
            ``dtype`` to write the totals into (and return), e.g. one buffer reused
            over many calls: a new 10-million-step array costs ~10 ms of page
            faults. Not with ``components=True``.

    Returns:
        The total step time per step, us, of ``dtype``; with ``components=True`` a
        dict of ``"total"`` and one array per component, us.

    Raises:
        ValueError: wrong shapes or dtypes, a negative or NaN statistic, or a group
            index out of range, naming the argument. Shapes, dtypes and groups are
            checked here; the values in the compiled loop, which reads them anyway
            (a bad step's total becomes NaN, and NumPy then names the first bad
            entry), in place of ``step_time``'s in-graph checks.
    """
    dt = _float_dtype(dtype)
    if not isinstance(stats, BatchStats):
        raise ValueError(f"stats must be a diffmodel.BatchStats, got {type(stats)}")
    cols = [_as_array(f"stats.{f}", getattr(stats, f), 1, "f") for f in STAT_FIELDS]
    n = cols[0].shape[0]
    for f, c in zip(STAT_FIELDS, cols, strict=True):
        if c.shape[0] != n:
            raise ValueError(
                f"stats.{f} has {c.shape[0]} steps, stats.{STAT_FIELDS[0]} has {n}"
            )
    deps, fac, n_groups = _resolve(deployments, factors, dt)
    g = _check_group(group, n, n_groups)

    def name_bad_value():  # the compiled loop saw one: find and name it
        for f, c in zip(STAT_FIELDS, cols, strict=True):
            _check_values(f"stats.{f}", c, "tokens, requests or token pairs")

    out = _check_out(out, n, dt, components)
    return _run_chunks(
        _stats_kernel,
        cols,
        [dt] * len(cols),
        [0] * len(cols),
        g,
        n,
        chunk_size,
        out_dtype=dt,
        deployments=deps,
        factors=fac,
        components=components,
        devices=devices,
        on_nan=name_bad_value,
        out=out,
    )


def predict_requests(
    new_tokens: ArrayLike,
    context_tokens: ArrayLike,
    mask: ArrayLike,
    deployments: Deployment,
    group: ArrayLike,
    factors: Factors | None = None,
    *,
    chunk_size: int | None = 2**20,
    dtype=jnp.float32,
    components: bool = False,
    devices=None,
    out: np.ndarray | None = None,
) -> np.ndarray | dict[str, np.ndarray]:
    """Step time of many steps given as padded per-request batches, us per GPU.

    Each step's statistics come from :func:`diffmodel.from_requests` (the exact
    form), inside the same compiled, chunked loop as :func:`predict_steps`.

    Args:
        new_tokens: ``[steps, R]`` tokens each request processes this step.
        context_tokens: ``[steps, R]`` tokens already cached for each request.
        mask: ``[steps, R]`` booleans, ``True`` for real requests. Padding entries
            must still be finite and ``>= 0`` (e.g. 0).
        deployments, group, factors, dtype, components, devices, out: as in
            :func:`predict_steps`.
        chunk_size: request slots (``steps * R``) per compiled call; ``None``: all.

    Returns:
        As :func:`predict_steps`.
    """
    dt = _float_dtype(dtype)
    new = _as_array("new_tokens", new_tokens, 2, "f")
    ctx = _as_array("context_tokens", context_tokens, 2, "f")
    m = _as_array("mask", mask, 2, "b")
    for name, a in (("context_tokens", ctx), ("mask", m)):
        if a.shape != new.shape:
            raise ValueError(
                f"{name} has shape {a.shape}, new_tokens has shape {new.shape}"
            )
    _check_values("new_tokens", new, "tokens")
    _check_values("context_tokens", ctx, "tokens")
    n, width = new.shape
    deps, fac, n_groups = _resolve(deployments, factors, dt)
    g = _check_group(group, n, n_groups)
    if chunk_size is not None and (int(chunk_size) != chunk_size or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive integer or None: {chunk_size}")
    steps_per_chunk = (
        None if chunk_size is None else max(1, chunk_size // max(width, 1))
    )
    out = _check_out(out, n, dt, components)
    return _run_chunks(
        _requests_kernel,
        [new, ctx, m],
        [dt, dt, np.bool_],
        [0, 0, False],
        g,
        n,
        steps_per_chunk,
        out_dtype=dt,
        deployments=deps,
        factors=fac,
        components=components,
        devices=devices,
        out=out,
    )


def predict_frame_fast(
    frame,
    *,
    model: str | None = None,
    hardware: str | None = None,
    tp: int | None = None,
    factors=None,
    chunk_size: int | None = 2**18,
    dtype=jnp.float32,
    components: bool = False,
) -> np.ndarray | dict[str, np.ndarray]:
    """:func:`predict_steps` for a pandas frame of steps, us per GPU.

    Columns and deployments are read as in :func:`diffmodel.predict` (by
    :func:`diffmodel.stats_from_frame` and :func:`diffmodel.groups_from_frame`);
    ``factors`` as there. Returns NumPy arrays (one entry per row), not a frame.
    """
    from .._predict import resolve_factors  # the frame path's factor resolution

    stats = stats_from_frame(frame)
    groups = groups_from_frame(frame, model=model, hardware=hardware, tp=tp)
    fac = resolve_factors(factors, groups.labels)
    return predict_steps(
        stats,
        groups.deployments,
        groups.index,
        fac,
        chunk_size=chunk_size,
        dtype=dtype,
        components=components,
    )
