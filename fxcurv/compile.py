"""``fxcurv.compile``: the pipeline, top to bottom.

trace (model + loss -> one graph) -> normalize -> checks -> backward (Jacobian-transpose nodes)
-> quantity extraction -> data-parallel collectives (with a process group) -> output -> cleanup
(dead code, detached parameters) -> GraphModule -> scheduling (extractions next to the factors
they read, so big values die early) -> optional ``torch.compile`` backend.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch import Tensor

from . import guard, quantities as q
from .backend import Backend, resolve_backend, with_backend
from .emit import Emitter
from .example import check_example_leaves, check_example_shapes
from .errors import CompileError, node_error, requesting
from .passes.analysis import (ancestors, descendants, loss_rank, mixes_samples, sample_carriers,
                              sample_data)
from .passes.backward import backward
from .passes.chunking import chunk_columns
from .passes.cleanup import draws_random, finalize, is_random
from .passes.normalize import normalize, pool_before_relu
from .passes.curvature.diag_hessian import residual_propagations
from .passes.curvature.products import TangentProducts
from .passes.curvature.kfra import KFRA
from .passes.curvature.regulariser import Regulariser
from .passes.curvature.sqrt_ggn import propagate_sqrt_ggn
from .passes.distributed import data_parallel
from .passes.invariant import check_derivative_paths
from .passes.per_sample import PerSample, SignedSum
from .passes.sample_axis import guard_sample_axis
from .passes.schedule import schedule_extractions
from .rules import COUPLES_ROWS, FIRST_ORDER, rule_for
from .rules.losses import check_scalar_loss
from .inputs import check_structured_inputs, samples_of
from .trace import Traced, trace, unwrapped

DEFAULT_COLUMN_BUDGET = 1 << 30


def compile(model: nn.Module, loss_fn: Callable, quantities: Sequence[str] = (), *,
            mc_samples: int = 1, process_group: Any = None,
            backend: Backend = "auto", verify: bool = True,
            column_chunk: Union[int, str, None] = "auto",
            column_budget: int = DEFAULT_COLUMN_BUDGET,
            sequence_length: Optional[int] = None,
            example: Optional[tuple] = None,
            custom_functions: str = "refuse") -> fx.GraphModule:
    """Compile ``loss_fn(model(x), y)`` into one step returning loss, gradient and quantities.

    Args:
        model: an fx-traceable ``nn.Module``. Its parameters are read live by the step (an
            in-place ``optimizer.step()`` is seen by the next call); the model is never mutated.
            Dropout and BatchNorm behave as in the mode (train/eval) the model has *now*.
        loss_fn: a torch loss module (``CrossEntropyLoss``, ``MSELoss``, ``BCEWithLogitsLoss``,
            ``NLLLoss``; reduction ``mean`` or ``sum``) or a callable ``(output, target)``
            returning a scalar, written with supported ops.
        quantities: BackPACK savefield names (``batch_grad``, ``batch_l2``, ...); see
            ``fxcurv.QUANTITIES``. Empty: loss and gradient only.
        mc_samples: number of Monte-Carlo samples for ``*_mc`` quantities and ``kfac``.
        process_group: a ``torch.distributed`` process group (e.g. ``ddp.process_group``):
            each rank passes its shard of the batch and the step's collectives make it
            return the results of the global batch (README, "Data-parallel curvature").
        backend: ``"auto"`` (default): decided from the parameters' device now: on CPU the
            plain GraphModule; on CUDA ``torch.compile`` with inductor and CUDA graphs
            (``mode="reduce-overhead"``; without CUDA graphs if the step draws random
            numbers or runs collectives; the plain step without triton); see
            ``fxcurv/backend.py``. ``None``: the plain GraphModule. Otherwise a
            ``torch.compile`` backend (``"inductor"``, ``"aot_eager"``, ... or a callable): the
            step's ``forward`` runs through ``torch.compile(..., backend=backend)``, compiled
            on the first call (a new batch size may recompile once, then the batch axis is
            dynamic). ``step.code`` / ``step.graph`` still show the generated code, and
            ``torch.jit.script(step)`` scripts that plain code (TorchScript cannot hold the
            compiled kernels). Under ``"inductor"``, Monte-Carlo quantities draw from
            inductor's own generator (same distribution, other samples than eager torch for
            the same seed, unless ``torch._inductor.config.fallback_random = True``).
        verify: ``True`` (default): the step's first call also computes loss and gradient by
            eager autograd on the same inputs and raises ``fxcurv.StepError`` if they differ
            beyond the dtype's tolerance (skipped with a warning when the forward draws
            random numbers, and for a ``process_group``); ``False``: no check. See
            ``fxcurv/guard.py`` and docs/verify.md.
        column_chunk: how the exact GGN factor ``[C, N, ...]`` (one column per class) is
            propagated (``diag_ggn_exact``, ``diag_ggn_exact_batch``, ``sqrt_ggn_exact``,
            ``kflr``, ``ggnmp``, the GGN part of ``diag_h``/``hmp``): ``"auto"`` (default) in
            chunks of as many columns as fit ``column_budget``, chosen at each call from the
            sizes; an int: that many columns per chunk; ``None``: all at once, inline in
            ``step.code`` (chunked, the propagation is in
            ``step.sqrt_ggn_exact_chunks.body.code``). Results do not depend on it (up to
            the order of floating-point sums). Under ``torch.compile``/``torch.export``,
            ``"auto"`` propagates all columns at once.
        column_budget: bytes for the chunked propagation (``"auto"``), default 1 GiB:
            estimated as 4 copies of the largest ``[N, ...]`` activation per column.
        sequence_length: the number of time steps ``T`` of the model's recurrent layers
            (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``), which are unrolled over ``T`` steps when
            tracing; the step checks ``T`` when it runs. Needed only for such models.
        example: one batch ``(x, y)``, for a forward with Python branches on sizes
            (``if x.shape[-1] < k``, a padding amount, ``v.device.type``), which fx cannot
            trace alone: each branch takes the way it takes for the example, the same for any
            number of samples (else a ``CompileError``), and the step then checks that it is
            called with the example's shapes past axis 0 (``fxcurv/example.py``). Not needed
            (and without effect on the step) for a forward without such branches.
        custom_functions: what a custom ``torch.autograd.Function`` on a derivative path
            becomes. ``"refuse"`` (default): a ``CompileError`` naming it (its own backward is
            invisible to the trace). ``"forward"``: its forward is traced as plain ops and
            differentiated like the rest; this assumes its backward is the exact derivative
            of its forward (memory-efficient activations such as a hand-written Swish, Bloom's
            GELU), which the first-call check tests on the first batch, where eager autograd
            runs the custom backward (a straight-through estimator or a gradient reversal
            fails it). A Function applied to data only runs as it is either way.

    ``x`` and ``y`` may be tensors or tuples, lists or dicts of tensors, each with the samples
    along axis 0, and the model may return several tensors (``fxcurv/inputs.py``).

    Returns:
        a ``torch.fx.GraphModule`` ``step`` with ``step(x, y) -> (loss, grad, *quantities)``;
        ``grad`` and each quantity are dicts keyed by ``model.named_parameters()`` names
        (trainable parameters only). ``print(step.code)`` shows the generated code and
        ``torch.jit.script(step)`` exports it.

    Raises:
        CompileError: naming the node, op, module and quantity, when something cannot be compiled;
            for an unknown ``backend``. The step itself raises ``fxcurv.StepError`` when a
            parameter of the model was replaced after ``compile`` (compile again), or when
            the first-call check fails.
    """
    if not isinstance(mc_samples, int) or mc_samples < 1:
        raise CompileError(f"mc_samples must be a positive int, got {mc_samples!r}.")
    if custom_functions not in ("refuse", "forward"):
        raise CompileError("custom_functions must be 'refuse' or 'forward', got "
                           f"{custom_functions!r}.")
    chunk = _column_chunk(column_chunk, column_budget)
    requested = q.resolve(quantities)
    model = unwrapped(model)
    traced = trace(model, loss_fn, sequence_length, fuse_recurrent=not requested,
                   example=example, custom_functions=custom_functions)
    if not traced.params:
        raise CompileError("the model has no trainable parameters (requires_grad=True) that the "
                           "loss depends on; there is nothing to differentiate.")
    needed_for = requested[0][0] if requested else "grad"
    with requesting(needed_for):
        return _compile(model, loss_fn, requested, traced, mc_samples, process_group, backend,
                        verify, chunk, column_budget)


def _compile(model, loss_fn, requested: list, traced: Traced, mc_samples: int, process_group,
             backend, verify: bool, chunk: Optional[int], column_budget: int) -> fx.GraphModule:
    """The pipeline of :func:`compile` after tracing (errors name the first quantity, or the
    one being extracted)."""
    normalize(traced.graph)
    if not any(quantity.source.kfra for _, quantity in requested):
        pool_before_relu(traced.graph, keep=(traced.model_output,))
    traced.refresh()
    loss_output = _scalar_loss(traced)
    skip_reason = _verify_skip_reason(traced, process_group)
    emit = Emitter(traced.graph)
    x, y = traced.inputs
    checked_x = _emit_input_check(emit, traced)
    with emit.naming("loss", pass_="backward"):
        seed = torch.ones_like(emit.proxy(traced.loss))
    emit.rename(seed, "loss_cotangent")
    active = check_derivative_paths(traced.graph, traced.params.values())
    _check_first_order(active, requested)
    _check_per_sample(traced, active, requested)
    batch_size = _emit_batch_size(emit, traced, checked_x.node)
    if requested:
        guard_sample_axis(traced, batch_size.node, [quantity for _, quantity in requested])
    cotangents = backward(emit, {traced.loss: seed}, traced.params.values())
    grads = _gradients(emit, traced, cotangents)
    results = _extract(emit, traced, requested, cotangents, grads, batch_size, mc_samples)
    outputs = (emit.proxy(loss_output), grads, *results)
    outputs = data_parallel(emit, traced, requested, outputs, process_group)
    sized = [quantity.extract.propagation_sized for _, quantity in requested]
    step = finalize(traced, emit, outputs, [name for name, _ in requested],
                    lambda graph: schedule_extractions(graph, traced.model_output, sized))
    step.meta["fxcurv"]["structured"] = traced.structured
    if chunk is not None:
        chunk_columns(step, chunk, column_budget)
    device = next(iter(traced.attrs[n.target] for n in traced.params.values())).device
    backend, mode = resolve_backend(backend, device, draws_random(step.graph),
                                    process_group is not None)
    step = with_backend(step, backend, mode)
    guard.install(step, model, loss_fn, list(traced.params), verify, skip_reason)
    return step


def _column_chunk(column_chunk: Any, column_budget: Any) -> Optional[int]:
    """``column_chunk`` as ``ColumnChunks.chunk`` (0: from the budget; None: no chunking)."""
    if not isinstance(column_budget, int) or isinstance(column_budget, bool) or \
            column_budget < 1:
        raise CompileError(f"column_budget must be a positive number of bytes, got "
                           f"{column_budget!r}.")
    if column_chunk is None:
        return None
    if column_chunk == "auto":
        return 0
    if isinstance(column_chunk, int) and not isinstance(column_chunk, bool) and \
            column_chunk >= 1:
        return column_chunk
    raise CompileError(f"column_chunk must be 'auto', None or a positive int, got "
                       f"{column_chunk!r}.")


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"torch.float32"`` (TorchScript prints dtypes as numbers)."""
    names = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
             torch.float64: "float64"}
    for candidate, name in names.items():
        if dtype == candidate:
            return "torch." + name
    return "a non-float type"


def _extract(emit: Emitter, traced: Traced, requested: list, cotangents: dict, grads: dict,
             batch_size: Any, mc_samples: int) -> list[dict[str, Any]]:
    """One dict per requested quantity; each propagation is emitted once, when first needed.
    A regulariser added to the loss (``passes/curvature/regulariser.py``) adds its exact
    Hessian to the curvature quantities and refuses per-sample ones and Kronecker factors."""
    vectors = _vectors_input(emit, traced) if any(
        "vectors" in q.extract.reads for _, q in requested) else {}
    sources: dict[str, Any] = {}
    x = traced.inputs[0]
    data = (sample_data(traced.graph, x), sample_carriers(traced.graph, x))
    regulariser = Regulariser(emit, traced, cotangents, data)
    regulariser.check(requested)
    # the factor's columns one by one (sqrt_ggn_*): else only sums over them are read
    columns_read = any(quantity.extract.method == "batch" and quantity.source.factor
                       for _, quantity in requested)

    def source(propagation: q.Propagation) -> Any:
        if propagation not in sources:
            sources[propagation] = _make_source(emit, traced, propagation, cotangents,
                                                batch_size, mc_samples, source, data,
                                                not columns_read)
        return sources[propagation]

    tangents: dict = {}

    def product(quantity, name: str) -> Any:
        """A block product by forward tangents where the parameter's path allows it, else
        from the propagated factors (passes/curvature/products.py; a coupled batch: from
        the factors)."""
        if traced.memo["coupled"]:
            return source(quantity.source).product(name, quantity.name, vectors[name])
        value = tangents_of(quantity.source).product(name, vectors[name])
        if value is None:
            value = source(quantity.source).product(name, quantity.name, vectors[name])
        return value

    def tangents_of(propagation: q.Propagation) -> TangentProducts:
        if propagation not in tangents:
            tangents[propagation] = TangentProducts(emit, traced, cotangents, propagation)
        return tangents[propagation]

    def diagonal(quantity, name: str) -> Any:
        """The Hessian's diagonal (summed or per sample) of a parameter with few entries on
        a chain by its entries' forward tangents (passes/curvature/products.py), else from
        the propagated factors."""
        value = None if traced.memo["coupled"] else tangents_of(quantity.source).diagonal(
            name, quantity.extract.method == "batch_sum_squares")
        if value is None:
            value = getattr(source(quantity.source), quantity.extract.method)(name,
                                                                              quantity.name)
        return value

    inputs = {"grad": grads, "vectors": vectors}
    results = []
    for label, quantity in requested:
        with emit.requesting(label):
            if quantity.extract.method == "product":
                values = {name: product(quantity, name) for name in traced.params}
            elif quantity.source is q.HESSIAN:
                values = {name: diagonal(quantity, name) for name in traced.params}
            else:
                method = getattr(source(quantity.source), quantity.extract.method)
                reads = [inputs[kind] for kind in quantity.extract.reads]
                values = {name: method(name, quantity.name, *[r[name] for r in reads])
                          for name in traced.params}
            results.append(regulariser.add(quantity, label, values,
                                           vectors if "vectors" in quantity.extract.reads
                                           else {}))
    for value in sources.values():  # gradients the first-order extractions computed anyway
        grads.update(getattr(value, "totals", {}))
    return results


def _make_source(emit: Emitter, traced: Traced, propagation: q.Propagation,
                 cotangents: dict, batch_size: Any, mc_samples: int, source,
                 data: tuple, low_rank: bool) -> Any:
    """The propagation a quantity reads (``quantities.Propagation``), as a PerSample (or a
    signed sum of them); ``low_rank``: no quantity reads a factor's columns one by one."""
    params = traced.params
    if propagation.factor is not None:
        factors, columns = propagate_sqrt_ggn(emit, traced, cotangents, propagation.factor,
                                              mc_samples, low_rank)
        numels = {n: traced.attrs[node.target].numel() for n, node in params.items()}
        return PerSample(emit, params, factors, batch_size, data, lead=1,
                         label=f"sqrt_ggn_{propagation.factor}", lead_size=columns,
                         numels=numels, coupled=bool(traced.memo["coupled"]),
                         merged=traced.memo.get("merged_rows", frozenset()))
    if propagation.signs is not None:
        weights = {1.0: propagation.signs[0], -1.0: propagation.signs[1]}
        terms = [(term, weights[sign]) for term, sign in source(q.RESIDUALS)
                 if weights[sign] != 0.0]
        return SignedSum([(source(q.GGN_EXACT), 1.0)] + terms)
    if propagation.kfra:
        return KFRA(emit, traced, cotangents)
    if propagation is q.RESIDUALS:
        def wrap(factors, columns, direct=None):
            return PerSample(emit, params, factors, batch_size, data, lead=1, label="residual",
                             lead_size=columns, direct=direct)
        return residual_propagations(emit, traced, cotangents, wrap)
    return PerSample(emit, params, cotangents, batch_size, data,
                     merged=traced.memo.get("merged_rows", frozenset()))


def check_inputs(x: Tensor, y: Tensor, dtype: torch.dtype) -> Tensor:
    """Call-time check: floating inputs in the parameters' dtype; one target per sample."""
    if x.is_floating_point() and x.dtype != dtype:
        raise ValueError("fxcurv: the input x has dtype {} but the model's parameters are {}; "
                         "convert it with x.to({})".format(dtype_name(x.dtype),
                                                           dtype_name(dtype), dtype_name(dtype)))
    if x.dim() == 0:
        raise ValueError("fxcurv: the input x must have a batch axis 0, got a scalar")
    if y.dim() > 0 and y.size(0) != x.size(0):
        raise ValueError("fxcurv: the target y has {} samples along axis 0 but the input x has "
                         "{}".format(y.size(0), x.size(0)))
    return x


def _emit_input_check(emit: Emitter, traced: Traced) -> Any:
    """Insert ``check_inputs(x, y, dtype)`` first; every reader of ``x`` reads the checked one."""
    x, y = traced.inputs
    dtype = next(iter(traced.attrs[n.target] for n in traced.params.values())).dtype
    check = check_structured_inputs if traced.structured else check_inputs
    with emit.graph.inserting_after(y):
        node = emit.graph.call_function(check, (x, y, dtype))
    node._rename("x_checked")
    x.replace_all_uses_with(node, delete_user_cb=lambda user: user is not node)
    if traced.example_shapes is not None:  # the trace took branches on the example's sizes
        check = check_example_leaves if traced.structured else check_example_shapes
        with emit.graph.inserting_after(node):
            shaped = emit.graph.call_function(check, (node, y, traced.example_shapes))
        node.replace_all_uses_with(shaped, delete_user_cb=lambda user: user is not shaped)
        shaped._rename("x_example_shaped")
        node = shaped
    return emit.proxy(node)


def _emit_batch_size(emit: Emitter, traced: Traced, checked_x: fx.Node) -> fx.Proxy:
    """``batch_size``, right after the input check: axis 0 of ``x`` (of its first part for a
    structured input)."""
    with emit.graph.inserting_after(checked_x):
        node = emit.graph.call_function(samples_of, (checked_x,)) if traced.structured else \
            emit.graph.call_method("size", (checked_x, 0))
    node._rename("batch_size")
    return emit.proxy(node)


def check_vectors(vectors: Dict[str, Tensor], name: str, param: Tensor) -> Tensor:
    """Call-time check of a product quantity's ``vectors[name]``: ``[V, *param.shape]``."""
    if name not in vectors:
        raise ValueError("fxcurv: vectors has no entry for parameter '{}'".format(name))
    vector = vectors[name]
    if vector.dim() != param.dim() + 1 or list(vector.shape[1:]) != list(param.shape):
        raise ValueError("fxcurv: vectors['{}'] must have shape [V, {}], got {}".format(
            name, ", ".join([str(s) for s in param.shape]), list(vector.shape)))
    return vector.to(param.dtype)


def _vectors_input(emit: Emitter, traced: Traced) -> dict[str, Any]:
    """A third input ``vectors: Dict[str, Tensor]`` (``[V, *p.shape]`` per parameter), checked."""
    y = traced.inputs[1]
    with emit.graph.inserting_after(y):
        node = emit.graph.placeholder("vectors", type_expr=Dict[str, Tensor])
    result = {}
    for name, param in traced.params.items():
        with emit.naming(f"{param.name}_vector"):
            result[name] = emit.call(check_vectors, emit.proxy(node), name, emit.proxy(param))
        emit.rename(result[name], f"{param.name}_vector")
    return result


def _verify_skip_reason(traced: Traced, process_group: Any) -> Optional[str]:
    """Why the first-call check against eager autograd cannot run for this step, or None."""
    if process_group is not None:
        return "a data-parallel step returns the results of the global batch"
    if any(is_random(node.target) for node in ancestors(traced.loss)):
        return ("the forward draws random numbers (e.g. dropout in train mode), which eager "
                "PyTorch would draw differently")
    return None


def _scalar_loss(traced: Traced) -> fx.Node:
    """The loss node the step returns. A loss the graph shows to keep the batch axis is a
    ``CompileError``; one whose shape the graph cannot tell is checked on every call
    (:func:`check_scalar_loss`, right after the loss is computed)."""
    loss = traced.loss
    rank = loss_rank(traced.graph, traced.inputs[0], traced.model_output, loss)
    if rank == "batched":
        raise node_error(loss, "the loss is not a scalar: it keeps the batch axis of the model "
                         "output, and differentiating it would give the gradient of the sum "
                         "of its entries", _SCALAR_HINT)
    if rank == "scalar":
        return loss
    with traced.graph.inserting_after(loss):
        checked = traced.graph.call_function(check_scalar_loss, (loss,))
    checked._rename("loss_checked")
    return checked


_SCALAR_HINT = ("Reduce the loss to a scalar: use reduction='mean' or 'sum' (e.g. "
                "nn.CrossEntropyLoss(reduction='mean')), or end the loss callable with .mean() "
                "or .sum().")


def _gradients(emit: Emitter, traced: Traced, cotangents: dict) -> dict[str, Any]:
    """``grad[name]``: the parameter's cotangent (zeros if the loss does not depend on it)."""
    grads = {}
    for name, node in traced.params.items():
        if node in cotangents:
            grads[name] = cotangents[node]
        else:
            with emit.naming(node.name):
                grads[name] = torch.zeros_like(emit.proxy(node))
        emit.rename(grads[name], f"{node.name}_grad")
    return grads


def _check_first_order(active: dict, requested: list) -> None:
    """Compile-time error for an op with first-order rules only (``FIRST_ORDER``: a fused
    kernel) on a derivative path of a step that requests quantities beyond the gradient."""
    if not requested:
        return
    for node in active:
        rule = rule_for(node)
        if rule is not None and rule.has(FIRST_ORDER):
            with requesting(requested[0][0]):
                raise node_error(node, f"{rule.name} has first-order rules only (a fused "
                                 "kernel), so it gives the gradient and no other quantity",
                                 "Compile without quantities for the gradient alone; fxcurv "
                                 "unrolls recurrent layers itself when quantities are "
                                 "requested.")


def _check_per_sample(traced: Traced, active: dict, requested: list) -> None:
    """Compile-time errors, for per-sample quantities, for ops that mix samples inside the
    model (BatchNorm in train mode, reductions over axis 0). An op that couples the rows
    (``COUPLES_ROWS``) is allowed for the quantities defined on a coupled batch
    (``Quantity.coupled``), and recorded in ``traced.memo["coupled"]``. Whether each node on a
    derivative path is ruled at all is checked before (``passes/invariant.py``)."""
    model_nodes = ancestors(traced.model_output) & descendants(traced.graph, traced.inputs[0])
    from_samples = sample_carriers(traced.graph, traced.inputs[0], through_mixing=True)
    traced.memo["coupled"] = []
    per_sample = [(name, quantity) for name, quantity in requested if quantity.per_sample]
    for node in active:
        rule = rule_for(node)
        if rule is None or node not in model_nodes:
            continue
        reason = mixes_samples(node, rule, rule.bind(node), from_samples)
        if not reason:  # (a value computed from sizes only, x.size(1), has no sample axis)
            continue
        couples = rule.has(COUPLES_ROWS)
        if couples:
            traced.memo["coupled"].append(node)
        refused = [name for name, quantity in per_sample if not (couples and quantity.coupled)]
        if refused:
            with requesting(refused[0]):
                raise node_error(node, f"{reason}, so per-sample quantities such as "
                                 f"'{refused[0]}' are undefined",
                                 _COUPLED_HINT if couples else _MIXING_HINT)


_MIXING_HINT = ("Per-sample quantities need every sample to pass through the model on its own: "
                "put BatchNorm layers in eval mode (model.eval()) before compiling, avoid "
                "reductions over the batch axis in forward, or request only 'grad'.")
_COUPLED_HINT = (f"In train mode BatchNorm couples the batch; {', '.join(q.coupled_names())} "
                 "are defined on it (the batch as one sample whose positions are its rows, see "
                 "docs/conventions.md). For the other quantities put BatchNorm layers in eval "
                 "mode (model.eval()) before compiling, or request only 'grad'.")


