"""Timing: warm-up calls (the first one reported as the first-call cost), then rounds that
call every contender of a cell once in turn, the order rotating each round."""
from __future__ import annotations

import time

import torch

from .contenders import Contender, first_line


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed_call(fn: Contender, device: str) -> float:
    """Seconds for one call, CUDA work included; the result (and what the call left on the
    model: grads, BackPACK's or Opacus' fields) is freed after the timing, so that no
    contender runs while another's results are alive (with per-sample results of GiBs that
    made the next contender's allocations up to 3x slower)."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    elapsed = time.perf_counter() - start
    del out
    fn.clear()
    return elapsed


def number_of_rounds(round_s: float, repeats: int, budget_s: float) -> int:
    """``repeats`` rounds, fewer when they would take longer than ``budget_s``: at least 3,
    or a single one when one round alone takes longer than the budget (a step of seconds)."""
    fitting = int(budget_s / max(round_s, 1e-9))
    floor = 3 if round_s <= budget_s else 1
    return min(repeats, max(fitting, floor))


def time_interleaved(contenders: dict, device: str, warmup: int, repeats: int,
                     budget_s: float) -> tuple[dict, dict, dict]:
    """Warm up each contender (at least one call: the first call, which for fxcurv includes
    what the step does once, is never timed), then rounds calling each once, rotating the
    order. Returns ``(times in ms per contender, first-call ms per contender, first error
    line per failed contender)``."""
    errors, first, fastest = {}, {}, {}
    for name, fn in list(contenders.items()):
        try:
            calls = [timed_call(fn, device) for _ in range(max(warmup, 1))]
        except Exception as exc:  # noqa: BLE001 - a failing contender is reported, not fatal
            errors[name] = first_line(exc)
            del contenders[name]
            continue
        first[name], fastest[name] = 1e3 * calls[0], min(calls)
    rounds = number_of_rounds(sum(fastest.values()), repeats, budget_s)
    times = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds if names else 0):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(1e3 * timed_call(contenders[name], device))
    return times, first, errors
