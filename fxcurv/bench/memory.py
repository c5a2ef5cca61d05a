"""Peak memory: each contender runs alone in a fresh process (forked from a server that has
only imported the libraries); after one warm-up call and freeing its results, the peak is reset
and the peak above the baseline during one more call is reported (CPU: the resident set,
``VmHWM - VmRSS``, with glibc told to return freed blocks; CUDA:
``torch.cuda.max_memory_allocated``). A run that dies, times out or passes the memory limit
reports that instead."""
from __future__ import annotations

import gc
import multiprocessing
import os
import sys
import time
from typing import Optional

import torch

from .contenders import MAKERS, Contender, first_line, quiet_warnings
from .timing import synchronize
from .workloads import prepare

try:
    import resource
except ImportError:  # Windows: no ru_maxrss; memory runs report what they can
    resource = None


def _proc_field(path: str, field: str) -> Optional[int]:
    """The ``field:`` line of a ``/proc`` file, in bytes (its value is in kB), or None."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def default_memory_limit_gib() -> float:
    """Half the available memory, at most 16 GiB (8 where ``/proc/meminfo`` is missing)."""
    available = _proc_field("/proc/meminfo", "MemAvailable")
    return min(16.0, available / 2 / 2**30) if available else 8.0

def _proc_status(field: str, pid: str = "self") -> Optional[int]:
    """A ``/proc/<pid>/status`` field in bytes (Linux), or None."""
    return _proc_field(f"/proc/{pid}/status", field)


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set (Linux >= 4.0: ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _max_rss() -> int:
    if resource is None:
        return 0
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure_peak(fn: Contender, device: str) -> dict:
    """Peak memory above the baseline during one call, after a warm-up call."""
    del_out = fn()
    del del_out
    fn.clear()
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base, method = torch.cuda.memory_allocated(), "torch.cuda.max_memory_allocated"
    elif _reset_peak_rss():
        base, method = _proc_status("VmRSS"), "VmHWM - VmRSS"
    else:  # no way to reset the peak: ru_maxrss (a lower bound when setup peaked higher)
        base, method = _max_rss(), "ru_maxrss"
    out = fn()
    synchronize(device)
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = _proc_status("VmHWM") if method == "VmHWM - VmRSS" else _max_rss()
    del out
    return {"peak_mib": max(peak - base, 0) / 2**20, "method": method}


def memory_child(conn, spec: dict) -> None:
    """Entry of a fresh process: build one workload and contender, measure its peak."""
    quiet_warnings()
    try:
        torch.set_num_threads(spec["threads"])
        setup = prepare(spec["workload"], spec["device"], spec["batch_size"], spec["vectors"])
        fn = MAKERS[spec["contender"]](setup, spec["quantity"])
        result = measure_peak(fn, spec["device"])
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = {"error": first_line(exc)}
    conn.send(result)
    conn.close()


class MemoryRunner:
    """Runs :func:`memory_child` in fresh processes forked from a server that has imported
    torch, fxcurv and BackPACK (so a child starts in milliseconds), with a memory limit and a
    timeout enforced from outside."""

    def __init__(self, limit_bytes: int, timeout_s: float):
        self.limit, self.timeout = limit_bytes, timeout_s
        method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() \
            else "spawn"
        self.ctx = multiprocessing.get_context(method)
        if method == "forkserver":
            # torch._inductor: fx's stack-trace recording imports it on the first trace (seconds)
            self.ctx.set_forkserver_preload(["torch", "torch._inductor", "torch.func",
                                             "fxcurv", "fxcurv.bench.memory", "backpack",
                                             "opacus"])
        self.target = memory_child

    def measure(self, spec: dict) -> dict:
        recv, send = self.ctx.Pipe(duplex=False)
        # glibc: allocations >= 64 KiB are mmap-ed and returned on free, so the resident set
        # follows the live tensors (read when the process starts: the server's environment)
        old = os.environ.get("MALLOC_MMAP_THRESHOLD_")
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
        try:
            proc = self.ctx.Process(target=self.target, args=(send, spec), daemon=True)
            proc.start()
        finally:
            _restore_env("MALLOC_MMAP_THRESHOLD_", old)
        send.close()
        result = self._watch(proc, recv)
        proc.join()
        return result

    def _watch(self, proc, recv) -> dict:
        deadline = time.monotonic() + self.timeout
        while True:
            if recv.poll(0.05):
                try:
                    return recv.recv()
                except EOFError:  # the child is gone without an answer
                    proc.join(5)
                    return {"error": f"memory run died (exit code {proc.exitcode})"}
            if not proc.is_alive():
                return {"error": f"memory run died (exit code {proc.exitcode})"}
            rss = _proc_status("VmRSS", str(proc.pid)) or 0
            if rss > self.limit:
                proc.kill()
                return {"error": f"over the {self.limit / 2**30:.1f} GiB memory limit "
                                 "(--max-memory-gib)"}
            if time.monotonic() > deadline:
                proc.kill()
                return {"error": f"memory run over {self.timeout:.0f} s (--child-timeout)"}


def _restore_env(key: str, old: Optional[str]) -> None:
    if old is None:
        os.environ.pop(key, None)
    else:
        os.environ[key] = old


