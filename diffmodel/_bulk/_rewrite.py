"""Rewrites that make the compiled step model fast on CPU without changing its value
beyond rounding (see :class:`_Evaluator`); used by prediction and by the bulk loss.
"""

import functools

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np

from .._model._batch import BatchStats
from .._model._deployment import Deployment
from .._model._factors import Factors
from .._model._roofline import COMPONENTS, step_time, step_total

STAT_FIELDS: tuple[str, ...] = tuple(BatchStats.__dataclass_fields__)

# Up to this many groups, per-step deployment values are chosen by a ``where`` chain
# (fuses into the elementwise loop); beyond it, by a gather.
_SELECT_MAX_GROUPS = 8
_ALIGN_ELEMS = 16


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
    """A value that depends on the deployment group only: one entry per group.

    ``kept`` marks a table computed from a differentiated factor (see
    :func:`_evaluate`'s ``keep_factors``): it is not folded into affine
    coefficients, so that its gradient is one sum over the steps per place it meets
    them rather than one per coefficient it would have been spread over.
    """

    __slots__ = ("table", "kept")

    def __init__(self, table, kept: bool = False):
        self.table, self.kept = table, kept


def _kept(*xs) -> bool:
    return any(isinstance(x, _PerGroup) and x.kept for x in xs)


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

    def __init__(self, group, n_groups: int, tables=None, differentiated=False):
        self.group, self.n_groups = group, n_groups
        self.differentiated = differentiated
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
                    if _is_one(coef):
                        term = base
                    else:
                        scale = self.per_step(coef, aval)
                        if self.zero(coef):
                            continue
                        term = base * scale
                    out = term if out is None else out + term
                if value.const is not None and not self.zero_const(value.const, aval):
                    const = self.per_step(value.const, aval)
                    if out is None:
                        out = jnp.broadcast_to(const, aval.shape).astype(aval.dtype)
                    else:
                        out = out + const
                if out is None:  # every term had a zero coefficient
                    out = jnp.zeros(aval.shape, aval.dtype)
                self.expanded[key] = (value, out, False)
            return self.expanded[key][1]
        if not isinstance(value, _PerGroup):
            return value
        key = id(value)
        if key not in self.expanded:
            zero = False
            if self.supplied is None:
                out = self.spread_table(value.table)
            else:
                distinct, plan = self.supplied
                same, j, zero = plan[len(self.collected)]
                if same:  # one value for all groups: no per-step choice
                    out = distinct[j][0]
                elif j in self.spread:  # equal to an earlier table: reuse its choice
                    out = self.spread[j]
                else:
                    out = self.spread[j] = self.spread_table(distinct[j])
            self.collected.append(value.table)
            self.expanded[key] = (value, jnp.broadcast_to(out, aval.shape), zero)
        return self.expanded[key][1]

    def zero(self, value) -> bool:
        """Whether ``value``, a table already spread by :meth:`per_step`, is 0 for
        every group (known from the supplied plan). A term it multiplies adds
        nothing (the inputs are finite), so it is left out, and with it the work
        that formed the term where nothing else uses it: a sliding window, experts,
        a sparse index that no deployment of the call has."""
        if not isinstance(value, _PerGroup):
            return False
        return self.expanded[id(value)][2]

    def zero_const(self, value, aval) -> bool:
        """:meth:`zero` for an affine's constant (spread first, keeping the order in
        which the tables are met)."""
        self.per_step(value, aval)
        return self.zero(value)

    def spread_table(self, t):
        """Each step's entry of the ``[groups]`` table ``t``."""
        if self.n_groups == 1:
            return t[0]
        if jnp.ndim(self.group) == 0:  # one group for all steps (a chunk of one)
            return t[self.group]
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
            table = op(self.table(a, aval), self.table(b, aval))
            return _PerGroup(table, _kept(a, b))
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
            if _kept(y):
                return None  # see _PerGroup.kept: the product is formed per step
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
            elif name == "custom_jvp_call" and not (
                self.differentiated
                and any(a.shape and not g for g, a in zip(grouped, avals, strict=True))
            ):
                # Its function, inlined: prediction then runs the evaluator's
                # rewrites inside it too, and tables alone (a smooth maximum of two
                # deployment values) stay per group. Under a gradient, with steps in,
                # the call is bound as it is below, keeping its derivative rule
                # (:func:`diffmodel.smooth_max`'s).
                sub = eqn.params["call_jaxpr"]
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
                outvals = [_PerGroup(self.bind(eqn, tables)[0], _kept(*invals))]
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


def _evaluate(
    stats, deployments, group, factors, components, tables=None, keep_factors=False
):
    """Evaluate the step model with :class:`_Evaluator`: (outputs, tables used).

    ``keep_factors``: for a gradient with respect to the tables: the factors'
    tables stay out of the affine coefficients (:class:`_PerGroup`'s ``kept``), and
    functions with their own derivative rule are kept whole.
    """
    n_groups = int(jnp.shape(deployments.tp)[0])
    shape = jnp.shape(stats.prefill_tokens)

    def step_shaped(x):
        if jnp.ndim(x) == 0:
            return x
        return jax.ShapeDtypeStruct(shape, jnp.result_type(x))

    # Traced from shapes alone, outside any mesh, so that the jaxpr (and the order in
    # which it uses the tables) does not depend on where the inputs live: sharded
    # or not, or inside ``shard_map`` (whose manual axes would add resharding).
    with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((), ())):
        closed, out_shape = jax.make_jaxpr(
            functools.partial(_total_and_parts, components=components),
            return_shape=True,
        )(
            jax.tree.map(step_shaped, stats),
            jax.tree.map(step_shaped, deployments),
            jax.tree.map(step_shaped, factors),
        )

    def wrap(x, kept=False):
        return x if jnp.ndim(x) == 0 else _PerGroup(jnp.asarray(x), kept)

    args = [
        *jax.tree.leaves(stats),
        *map(wrap, jax.tree.leaves(deployments)),
        *(wrap(x, keep_factors) for x in jax.tree.leaves(factors)),
    ]
    ev = _Evaluator(group, n_groups, tables, differentiated=keep_factors)
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
    """Distinct tables and, per table, ``(same for all groups, index into them, 0
    for all groups)``.

    With the values in hand (a few numbers per group), tables equal to an earlier one
    share its per-step choice and tables equal across groups (the same hardware,
    shared factors, zeros of a dense model) need none: about half of the ``where``
    selections of a typical mix go; terms whose coefficient is 0 in every group go
    too (:meth:`_Evaluator.zero`). The plan is static, so it is compiled in; it
    changes only with the pattern of equal values and zeros, not with the values.
    """
    host = [np.asarray(t) for t in tables]
    distinct, plan, seen = [], [], {}
    for t, h in zip(tables, host, strict=True):
        key = (h.dtype.str, h.tobytes())
        if key not in seen:
            seen[key] = len(distinct)
            distinct.append(t)
        plan.append((bool(np.all(h == h[0])), seen[key], bool(np.all(h == 0))))
    return tuple(distinct), tuple(plan)
