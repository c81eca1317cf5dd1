"""SimAM, the parameter-free attention module (Yang et al., ICML 2021).

For every channel of X (N, C, H, W), with n = H*W - 1:

    d   = (X - mean(X))^2
    v   = sum(d) / n                     # variance with the H*W-1 divisor
    out = X * sigmoid(d / (4 * (v + lambda)) + 0.5)

which is X * sigmoid(1 / e*) with e* the minimal energy of the paper's Eq. 5. This is
the official code's tensor form, to the letter.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor, nn

__all__ = ["SimAM", "simam", "set_e_lambda", "check_e_lambda"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_e_lambda(e_lambda: object) -> float:
    """Return ``e_lambda`` as a float, or raise ValueError unless it is a finite number > 0."""
    ok = isinstance(e_lambda, numbers.Real) and not isinstance(e_lambda, bool)
    if ok:
        value = float(e_lambda)
        if math.isfinite(value) and value > 0:
            return value
    raise ValueError(f"e_lambda must be a finite number > 0, got e_lambda={e_lambda!r}")


def simam(x: Tensor, e_lambda: float | Tensor) -> Tensor:
    """Functional SimAM.

    ``e_lambda`` is a Python number (checked) or a tensor that broadcasts against
    (N, C, 1, 1), for code that holds lambda as a tensor (a buffer, or one lambda per
    stacked model). A tensor is not checked here: that would need a host sync.

    Mean, variance and the division run in float32 when ``x`` is float16 or bfloat16
    (as under autocast); the result has the dtype of ``x``.
    """
    if not isinstance(e_lambda, Tensor):
        e_lambda = check_e_lambda(e_lambda)
    if x.dim() != 4:
        raise ValueError(f"SimAM expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    n = h * w - 1
    if n < 1:
        raise ValueError(
            f"input is too small for SimAM: it needs H*W >= 2 neurons per channel, got {h}x{w}"
        )
    xf = x.float() if x.dtype in _LOW_PRECISION else x
    d = (xf - xf.mean(dim=(2, 3), keepdim=True)).square()
    v = d.sum(dim=(2, 3), keepdim=True) / n
    y = d / (4 * (v + e_lambda)) + 0.5
    return (xf * torch.sigmoid(y)).to(x.dtype)


class SimAM(nn.Module):
    """SimAM as a layer. Lambda lives in a (non-persistent) buffer.

    A buffer lets one compiled graph serve every lambda (change it in place with
    :meth:`set_e_lambda`) and moves with the module between devices. It is not part of
    the state dict: lambda is a hyperparameter, not a weight, so a SimAM network's state
    dict equals its baseline's and checkpoints load whatever lambda the network has.
    The buffer is float64, so lambda is exactly the number given; as a 0-dim tensor it
    does not promote float32 or bfloat16 activations.
    """

    def __init__(self, e_lambda: float = 1e-4) -> None:
        super().__init__()
        self.register_buffer(
            "e_lambda", torch.tensor(check_e_lambda(e_lambda), dtype=torch.float64), persistent=False
        )

    def set_e_lambda(self, e_lambda: float) -> None:
        """Change lambda in place (no new tensor, so compiled graphs stay valid)."""
        self.e_lambda.fill_(check_e_lambda(e_lambda))

    def forward(self, x: Tensor) -> Tensor:
        return simam(x, self.e_lambda)

    def extra_repr(self) -> str:
        return f"e_lambda={self.e_lambda.item():g}"


def set_e_lambda(model: nn.Module, e_lambda: float) -> int:
    """Set lambda of every SimAM layer in ``model``; return how many layers were set."""
    value = check_e_lambda(e_lambda)
    layers = [m for m in model.modules() if isinstance(m, SimAM)]
    for layer in layers:
        layer.set_e_lambda(value)
    return len(layers)
