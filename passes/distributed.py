"""Data parallelism: every rank's step returns the result of the global batch.

Runs after the quantities are extracted. Rank ``r`` computed everything on its local batch of
``N_r`` samples, with its loss divided by its local mean divisor ``d_r``. The global loss is
``L = Σ_r (d_r / D) L_r`` (``D = Σ_r d_r``; ``d_r / D = 1`` for ``reduction='sum'``), so a
quantity proportional to ``(1/d)^k`` becomes global after scaling by ``w_r^k = (d_r / D)^k``
and a sum over the ranks (``all_reduce``), or a gather along the sample axis (``all_gather``).

The pass emits, right after the loss, the loss rule's divisors and ``x.size(0)`` as one row of
counts per rank and all-gathers it (``[W, 3]``: the shares, the global N and the padding of
unequal batches follow from it). Then, for each returned quantity, it scales every parameter's
value by its share and issues one coalesced collective right after the last of them is
computed (so it runs while the rest of the step computes); the waits, and what follows
them (cutting the padding, the variance), sit before the output. Per quantity
(``Quantity.reduction``, ``fxcurv/quantities.py``):

======================  ==================================================================
sum of ``w^k · q``      loss, grad (k=1); sum_grad_squared (k=2); diag_ggn_*, diag_h,
                        products (k=1, the Hessian factor's divisor)
gather along N          batch_grad, diag_*_batch (k=1), batch_l2 (k=2), sqrt_ggn_* (k=½,
                        sample axis 1); unequal N_r are zero-padded to max N_r and cut back
variance                ``Σ g²/N - (Σ g/N)²`` from the global ``Σ g²`` (k=2), grad and N
kron                    G (depends on the loss factor): k=1, summed; A (forward statistics
                        ``Σ x xᵀ / N_r``): scaled by ``N_r / N`` and summed
kfra                    the dense matrix is averaged over the batch at every step whose
                        Jacobian depends on the sample (activations, pooling), so the pass
                        all-reduces it right where it is formed (``N_r / N`` shares); G is
                        then the same on every rank, A as above
======================  ==================================================================
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
import torch.fx as fx

from fxcurv import distributed as helpers
from fxcurv.distributed import GRADIENT, HESSIAN, SAMPLES
from fxcurv.emit import Emitter
from fxcurv.errors import CompileError, node_error, requesting
from fxcurv.inputs import samples_of
from fxcurv.quantities import Reduction
from fxcurv.rules import Ctx, rule_for

from .analysis import descendants
from .cleanup import is_random
from .curvature.kfra import averages_samples, summed_outer

COLLECTIVES = torch.ops._c10d_functional


GRAD = Reduction("sum", "gradient")  # the gradient: summed, scaled like it
COLUMNS = {"gradient": GRADIENT, "hessian": HESSIAN, "samples": SAMPLES}
# the shares a step may use: (divisor column, power); unused ones are removed as dead code
SHARES = [("gradient", 1.0), ("gradient", 2.0), ("hessian", 1.0), ("hessian", 0.5),
          ("samples", 1.0)]


def data_parallel(emit: Emitter, traced, requested: list, outputs: tuple,
                  process_group: Optional[Any]) -> tuple:
    """``(loss, grad, *results)`` of the local batch -> those of the global batch (unchanged
    without a process group)."""
    if process_group is None:
        return outputs
    group = _check_group(process_group)
    _check_generators(traced, requested, group)
    plan = DataParallel(emit, traced, group, requested)
    loss, grads, *results = outputs
    global_loss = plan.reduce_sum({"loss": loss}, GRAD, "loss")["loss"]
    global_grads = plan.reduce_sum(grads, GRAD, "grad")
    reduced = []
    for (label, quantity), values in zip(requested, results):
        reduction = quantity.reduction
        if reduction.kind == "variance":
            reduced.append(plan.variance(values, grads, global_grads, label))
        elif reduction.kind in ("kron", "kfra"):
            reduced.append(plan.kron(values, reduction, label))
        else:
            method = plan.reduce_sum if reduction.kind == "sum" else plan.gather
            reduced.append(method(values, reduction, label))
    emit.graph.lint()
    return (global_loss, global_grads, *reduced)


class DataParallel:
    """Emits the counts, the shares and the collectives of one step."""

    def __init__(self, emit: Emitter, traced, group, requested: list):
        self.emit, self.traced, self.graph = emit, traced, emit.graph
        self.group_name, self.world = group.group_name, group.size()
        self.mean = self._reduction() == "mean"
        self._emit_counts(any(q.reduction.part == "both" for _, q in requested))
        if any(q.reduction.kind == "kfra" for _, q in requested):
            self._reduce_kfra_matrices()

    # -- counts and shares ------------------------------------------------------------------
    def _reduction(self) -> str:
        loss = self.traced.loss
        rule = rule_for(loss)
        with requesting("grad"):  # the gradient's reduction already
            if rule is None or rule.loss is None:
                raise node_error(loss, "data parallelism rescales each rank's results by its "
                                 "share of the loss's mean divisor, which fxcurv knows for "
                                 "built-in losses only", "End the loss in cross_entropy, "
                                 "nll_loss, mse_loss or binary_cross_entropy_with_logits "
                                 "(reduction 'mean' or 'sum').")
            reduction = rule.bind(loss)["reduction"]
            if reduction not in ("mean", "sum"):
                raise node_error(loss, f"reduction {reduction!r} does not give a scalar loss",
                                 "Use reduction 'mean' or 'sum'.")
        return reduction

    def _emit_counts(self, check_divisors: bool) -> None:
        """Right after the loss: this rank's counts row, all-gathered, and every share."""
        loss, x = self.traced.loss, self.traced.inputs[0]
        before = loss.next
        at = Emitter(self.graph, before=before)
        rule = rule_for(loss)
        ctx = Ctx.of(loss, rule, at)
        with at.naming("loss", pass_="distributed"):
            divisors = [rule.loss.mean_divisor(ctx, part) if self.mean else None
                        for part in ("gradient", "hessian")]
            self.batch_size = at.call(samples_of, at.proxy(x)) if self.traced.structured \
                else at.proxy(x).size(0)
            row = at.call(helpers.rank_counts, self.batch_size, *divisors, ctx.args.input)
        at.rename(self.batch_size, "local_batch_size")
        at.rename(row, "rank_counts")
        with at.naming("counts", pass_="distributed"):
            counts = self._wait(at, at.call(COLLECTIVES.all_gather_into_tensor, row,
                                            self.world, self.group_name))
            if check_divisors and self.mean:
                counts = at.call(helpers.check_divisors, counts)
        at.rename(counts, "counts")
        like = ctx.args.input
        self.sizes = self._named(at, "batch_sizes", helpers.sample_sizes, counts)
        self.total = self._named(at, "global_batch_size", helpers.total_count, counts, SAMPLES,
                                 like)
        self.shares = {}
        for part, power in SHARES:
            if self.mean or part == "samples":
                name = f"{part}_share" + {1.0: "", 2.0: "_squared", 0.5: "_sqrt"}[power]
                self.shares[part, power] = self._named(at, name, helpers.rank_share, counts,
                                                       row, COLUMNS[part], power, like)
        self.ready = before.prev

    def share(self, part: str, power: float) -> Any:
        """This rank's weight ``(d_r / D)^power`` (None: 1, for ``reduction='sum'``); "both"
        parts use the gradient's divisor, checked equal to the Hessian factor's."""
        return self.shares.get(("gradient" if part == "both" else part, power))

    # -- one method per kind of reduction ------------------------------------------------------
    def reduce_sum(self, values: dict, reduction: Reduction, label: str) -> dict:
        """``Σ_r w_r^k · value_r``, one coalesced all-reduce for the whole quantity."""
        share = self.share(reduction.part, reduction.power)
        pending = self._all_reduce({name: (v, share) for name, v in values.items()}, label)
        return {name: self._finish(pending[name], self._label(name, label)) for name in values}

    def gather(self, values: dict, reduction: Reduction, label: str) -> dict:
        """``w_r^k · value_r`` gathered along the sample axis in rank order (zero-padded to the
        largest batch, cut back after)."""
        share = self.share(reduction.part, reduction.power)
        at = self._issue_point(values.values())
        with at.naming(label, pass_="distributed"):
            padded = [at.call(helpers.pad_samples, self._scaled(at, v, share), self.sizes,
                              reduction.axis) for v in values.values()]
            gathered = at.call(COLLECTIVES.all_gather_into_tensor_coalesced, padded,
                               self.world, self.group_name)
            pending = [gathered[i] for i in range(len(padded))]
        result = {}
        for name, item in zip(values, pending):
            prefix = self._label(name, label)
            with self.emit.naming(prefix, pass_="distributed"):
                result[name] = self.emit.call(helpers.unpad_samples, self._wait(self.emit, item),
                                              self.sizes, reduction.axis)
            self.emit.rename(result[name], f"{prefix}_global")
        return result

    def variance(self, values: dict, grads: dict, global_grads: dict, label: str) -> dict:
        """The global ``Σ g²`` (from each rank's variance and gradient), then the variance."""
        at = self._issue_point(list(values.values()) + list(grads.values()))
        sums = {}
        for name, value in values.items():
            with at.naming(self._label(name, label), pass_="distributed"):
                sums[name] = at.call(helpers.sum_squares_from_variance, value, grads[name],
                                     self.batch_size)
            at.rename(sums[name], f"{self._label(name, label)}_sum_squares")
        sums = self.reduce_sum(sums, Reduction("sum", "gradient", 2.0), f"{label}_sum_squares")
        result = {}
        for name, total in sums.items():
            prefix = self._label(name, label)
            with self.emit.naming(prefix, pass_="distributed"):
                result[name] = self.emit.call(helpers.variance_from_sums, total,
                                              global_grads[name], self.total)
            self.emit.rename(result[name], f"{prefix}_global")
        return result

    def kron(self, values: dict, reduction: Reduction, label: str) -> dict:
        """Kronecker factors: G (downstream of the model output) carries the loss's scaling,
        A (forward statistics) the ``N_r / N`` share. KFRA's G is already global."""
        curvature = descendants(self.graph, self.traced.model_output)
        entries = {}
        for name, factors in values.items():
            for i, factor in enumerate(factors):
                is_g = factor.node in curvature
                if not (is_g and reduction.kind == "kfra"):
                    part = reduction.part if is_g else "samples"
                    entries[name, i] = factor, self.share(part, 1.0)
        pending = self._all_reduce(entries, label) if entries else {}
        return {name: [self._finish(pending[name, i], self._label(name, f"{label}_{i}"))
                       if (name, i) in pending else factor for i, factor in enumerate(factors)]
                for name, factors in values.items()}

    def _reduce_kfra_matrices(self) -> None:
        """All-reduce KFRA's dense matrix where it is formed: the loss's ``Σ S Sᵀ`` (Hessian
        share) and every batch average ``(1/N_r) Σ_n J_nᵀ M J_n`` (``N_r / N`` share)."""
        hessian, samples = self.share("hessian", 1.0), self.share("samples", 1.0)
        for node in list(self.graph.nodes):
            if node.op == "call_function" and node.target is summed_outer:
                share = hessian
            elif averages_samples(node):
                share = samples
            else:
                continue
            readers, at = list(node.users), Emitter(self.graph, before=node.next)
            with at.naming(node.name, pass_="distributed"):
                scaled = self._scaled(at, at.proxy(node), share)
                pending = at.call(COLLECTIVES.all_reduce_coalesced, [scaled], "sum",
                                  self.group_name)
                total = self._wait(at, pending[0])
            at.rename(total, f"{node.name}_global")
            for reader in readers:
                reader.replace_input_with(node, total.node)

    # -- building blocks -----------------------------------------------------------------------
    def _all_reduce(self, entries: dict, label: str) -> dict:
        """Issue one coalesced all-reduce of ``value · share`` for every entry, right after the
        last value is computed; return each entry's pending result. Values computed by the
        same call with the same arguments (a linear layer's weight and bias G) are sent once."""
        at = self._issue_point([value for value, _ in entries.values()])
        index, slot, tensors = {}, {}, []
        with at.naming(label, pass_="distributed"):
            for key, (value, share) in entries.items():
                same = (_structure(value.node), share.node if share is not None else None)
                if same not in index:
                    index[same] = len(tensors)
                    tensors.append(self._scaled(at, value, share))
                slot[key] = index[same]
            reduced = at.call(COLLECTIVES.all_reduce_coalesced, tensors, "sum", self.group_name)
            items = [reduced[i] for i in range(len(tensors))]
        return {key: items[slot[key]] for key in entries}

    def _issue_point(self, values) -> Emitter:
        """An emitter right after the last computed of ``values`` (and the shares)."""
        order = {node: i for i, node in enumerate(self.graph.nodes)}
        nodes = [self.ready] + [_node(v) for v in _flatten(values)]
        last = max((n for n in nodes if n is not None), key=order.__getitem__)
        return Emitter(self.graph, before=last.next)

    def _scaled(self, at: Emitter, value: Any, share: Any) -> Any:
        if share is None:
            return value
        scaled = at.proxy(_node(value)) * share  # emitted by ``at``, at its place
        at.rename(scaled, f"{_node(value).name}_share")
        return scaled

    def _wait(self, at: Emitter, pending: Any) -> Any:
        return at.call(COLLECTIVES.wait_tensor, pending)

    def _finish(self, pending: Any, label: str) -> Any:
        """Wait for a reduced value, just before the output."""
        with self.emit.naming(label, pass_="distributed"):
            value = self._wait(self.emit, pending)
        self.emit.rename(value, f"{label}_global")
        return value

    def _label(self, name: str, label: str) -> str:
        """``fc1_weight_diag_ggn_exact`` for a parameter's value, ``label`` for the loss."""
        params = self.traced.params
        return f"{params[name].name}_{label}" if name in params else label

    def _named(self, at: Emitter, name: str, fn, *args) -> Any:
        with at.naming(name, pass_="distributed"):
            value = at.call(fn, *args)
        at.rename(value, name)
        return value


def _node(value: Any) -> Optional[fx.Node]:
    return value.node if isinstance(value, fx.Proxy) else None


def _flatten(values) -> list:
    flat = []
    for value in values:
        flat.extend(value if isinstance(value, (list, tuple)) else [value])
    return flat


def _structure(node: fx.Node) -> tuple:
    """Two calls of the same op on the same arguments compute the same value (the nodes
    that common-subexpression elimination merges later, one level deep); random ops never."""
    if node.op not in ("call_function", "call_method") or is_random(node.target):
        return (node,)
    return node.op, node.target, repr(node.args), repr(node.kwargs)


def _check_group(group: Any):
    if not dist.is_available() or not dist.is_initialized():
        raise CompileError("process_group is given but torch.distributed is not initialized; "
                           "call torch.distributed.init_process_group first.")
    if not isinstance(group, dist.ProcessGroup):
        raise CompileError("process_group must be a torch.distributed.ProcessGroup (e.g. "
                           "torch.distributed.group.WORLD or ddp.process_group), got "
                           f"{type(group).__name__}.")
    return group


def _check_generators(traced, requested: list, group) -> None:
    """Monte-Carlo quantities need independent samples on every rank."""
    sampled = [label for label, q in requested if q.source.factor == "mc"]
    if sampled:
        device = next(iter(traced.attrs[n.target] for n in traced.params.values())).device
        helpers.check_independent_generators(group, device, sampled[0])
