"""Square-root factors shared by the curvature passes."""
from __future__ import annotations

import torch
from torch import Tensor


def residual_sqrt(residual: Tensor, sign: float) -> Tensor:
    """``diag(√max(sign·R, 0))`` as a factor ``[D, N, *R.shape[1:]]``, ``D = R[0].numel()``."""
    part = (residual * sign).clamp(min=0.0).sqrt()
    samples = part.size(0)
    flat = part.reshape(samples, -1)
    eye = torch.eye(flat.size(1), dtype=part.dtype, device=part.device)
    factor = eye.unsqueeze(1) * flat.unsqueeze(0)                     # [D, N, D]
    return factor.reshape([flat.size(1)] + list(part.shape))
