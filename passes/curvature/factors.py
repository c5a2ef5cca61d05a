"""Square-root factors shared by the curvature passes."""
from __future__ import annotations

import torch
from torch import Tensor


# the largest residual factor ``[D, N, D]`` built, in bytes per sample (``D²`` entries); beyond
# it the step refuses (elementwise residuals on wide activations: request the GGN instead).
# Per sample, so that the check does not depend on the batch size (dynamic-batch export).
MAX_RESIDUAL_FACTOR_BYTES = 256 * 2 ** 20


def residual_sqrt(residual: Tensor, sign: float, where: str, limit: int) -> Tensor:
    """``diag(√max(sign·R, 0))`` as a factor ``[D, N, *R.shape[1:]]``, ``D = R[0].numel()``;
    a RuntimeError naming ``where`` if it would exceed ``limit`` bytes per sample
    (``MAX_RESIDUAL_FACTOR_BYTES`` when the step was compiled)."""
    samples = residual.size(0)
    width = residual[0].numel()
    size = width * width * residual.element_size()
    if size > limit:
        raise RuntimeError("fxcurv: {}: the exact diagonal Hessian needs this op's residual "
                           "square-root factor [D, N, D] with D = {} and N = {} ({} bytes per "
                           "sample > {}); request the GGN (diag_ggn_exact, ggnmp) for this "
                           "model".format(where, width, samples, size, limit))
    part = (residual * sign).clamp(min=0.0).sqrt()
    flat = part.reshape(samples, -1)
    eye = torch.eye(flat.size(1), dtype=part.dtype, device=part.device)
    factor = eye.unsqueeze(1) * flat.unsqueeze(0)                     # [D, N, D]
    return factor.reshape([flat.size(1)] + list(part.shape))
