"""Fixtures shared by the test modules.

CUDA: ``device`` runs a test on the CPU and, where a GPU is available, again on CUDA (the
CUDA item is marked ``cuda`` and skipped without one); ``cuda_device`` is for tests that run
on CUDA only. ``pytest -m cuda`` selects the CUDA items (``.ci/gpu_check.sh``).
"""
from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device")
ON_CUDA = [pytest.mark.cuda, requires_cuda]
# torch before 2.14 (2.11 tested) fixes the batch size of conv squares and Kronecker factors
# in torch.export (docs/export.md#torch-versions); CI's torch runs these tests in full
OLD_EXPORT = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) < (2, 14)


def pytest_collection_modifyitems(items):
    """``dynamic_export`` tests are expected to fail on torch < 2.14 with "Constraints
    violated" (not strict: the cases without convolution squares pass there)."""
    if not OLD_EXPORT:
        return
    from torch._dynamo.exc import UserError  # noqa: PLC0415
    for item in items:
        if item.get_closest_marker("dynamic_export"):
            item.add_marker(pytest.mark.xfail(
                raises=UserError, strict=False,
                reason="torch < 2.14 fixes the batch size there (docs/export.md)"))


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=ON_CUDA)])
def device(request) -> torch.device:
    """``cpu``, then ``cuda`` (skipped without a GPU; TF32 off while it runs)."""
    if request.param == "cpu":
        yield torch.device("cpu")
        return
    with no_tf32():
        yield torch.device("cuda")


@pytest.fixture(params=[pytest.param("cuda", marks=ON_CUDA)])
def cuda_device(request) -> torch.device:
    """``cuda`` only (skipped without a GPU; TF32 off while it runs): for CUDA twins of CPU
    tests."""
    with no_tf32():
        yield torch.device(request.param)


@contextmanager
def no_tf32():
    """Full float32 precision in matmuls and cuDNN convolutions (TF32 keeps 10 mantissa
    bits, beyond any float32 tolerance), restored after."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors gain nothing from intra-op threads, which only spin on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
