"""``python -m fxcurv.bench``: fxcurv's compiled step against BackPACK and plain autograd.

For every workload (model, loss, batch) and quantity, each contender computes the quantity
from scratch once per call:

* ``fxcurv``: the step from ``fxcurv.compile`` with its defaults (compiled outside the timing;
  its first call, with whatever a step does once, is a warm-up call, reported as the
  first-call cost and never timed);
* ``fxcurv+inductor`` (with ``--inductor``): the same step with ``backend="inductor"``;
* ``BackPACK``: ``extend``-ed copies of model and loss, forward and backward inside
  ``with backpack(Extension())`` (products: then applied to the vectors);
* ``autograd``: plain forward + ``loss.backward()`` (the gradient only: the baseline);
* for ``batch_grad`` also ``torch.func.vmap(grad)`` and Opacus' ``GradSampleModule`` (when
  Opacus is installed).

Modules: :mod:`.workloads` (models and batches), :mod:`.contenders`, :mod:`.timing`
(interleaved rounds), :mod:`.memory` (peak memory in fresh processes), :mod:`.driver` (the
run), :mod:`.report` (tables, targets), :mod:`.cli` (options, exit status). Nothing here is
imported by ``import fxcurv``; BackPACK, Opacus and tabulate are imported only when used.
The method is written up in ``docs/benchmark.md``.
"""
from .cli import BEGIN, END, main, options, parse_args, preflight, failure, update_doc
from .contenders import MAKERS, Contender, contenders_for, make_fxcurv, make_fxcurv_inductor
from .driver import Options, _row, _with_ratios, run
from .memory import MemoryRunner
from .report import COMPACT_HEADERS, HEADERS, compact_table, doc_section, report, table, \
    targets
from . import timing
from .workloads import WORKLOADS, Setup, prepare

__all__ = ["main", "WORKLOADS", "prepare", "run", "Options", "report", "table",
           "compact_table", "targets"]
