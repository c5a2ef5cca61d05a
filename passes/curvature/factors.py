"""Square-root factors shared by the curvature passes."""
from __future__ import annotations

import torch
from torch import Tensor


# the largest residual factor ``[D, N, D]`` built, in bytes; beyond it the step refuses
# (elementwise residuals on wide activations: request the GGN instead)
MAX_RESIDUAL_FACTOR_BYTES = 4 * 2 ** 30


def residual_sqrt(residual: Tensor, sign: float, where: str = "an elementwise op") -> Tensor:
    """``diag(√max(sign·R, 0))`` as a factor ``[D, N, *R.shape[1:]]``, ``D = R[0].numel()``;
    a RuntimeError naming ``where`` if it would exceed ``MAX_RESIDUAL_FACTOR_BYTES``."""
    samples = residual.size(0)
    width = residual[0].numel()
    size = width * samples * width * residual.element_size()
    if size > MAX_RESIDUAL_FACTOR_BYTES:
        raise RuntimeError(f"fxcurv: {where}: the exact diagonal Hessian needs this op's "
                           f"residual square-root factor [D, N, D] with D = {width} and "
                           f"N = {samples} ({size / 2 ** 30:.1f} GiB > "
                           f"{MAX_RESIDUAL_FACTOR_BYTES / 2 ** 30:.1f} GiB); request the GGN "
                           "(diag_ggn_exact, ggnmp) for this model, or use a smaller batch")
    part = (residual * sign).clamp(min=0.0).sqrt()
    flat = part.reshape(samples, -1)
    eye = torch.eye(flat.size(1), dtype=part.dtype, device=part.device)
    factor = eye.unsqueeze(1) * flat.unsqueeze(0)                     # [D, N, D]
    return factor.reshape([flat.size(1)] + list(part.shape))
