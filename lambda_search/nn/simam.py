"""SimAM, the parameter-free attention module (Yang et al., ICML 2021).

For every channel of X (N, C, H, W), with n = H*W - 1:

    d   = (X - mean(X))^2
    v   = sum(d) / n                     # variance with the H*W-1 divisor
    out = X * sigmoid(d / (4 * (v + lambda)) + 0.5)

which is X * sigmoid(1 / e*) with e* the minimal energy of the paper's Eq. 5. This is
the official code's tensor form, to the letter (:func:`simam_reference`).

On the CPU, float32 inputs go through a fused kernel (``simam_cpu.c``) with a closed-form
backward: the same equations, one image at a time in cache, about a third of the cost.
Its results equal the reference to float32 rounding (tested against float64). In training,
:class:`SimAMBatchNorm` (the BatchNorm after SimAM in every residual block) runs SimAM and
itself as one kernel of the same file.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import E_LAMBDA_MIN, check_lambda  # noqa: F401  (E_LAMBDA_MIN: the smallest normal float32)
from .kernels import cpu_kernel

__all__ = ["SimAM", "SimAMBatchNorm", "simam", "simam_reference", "set_e_lambda", "check_e_lambda"]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_e_lambda(e_lambda: object) -> float:
    """Return ``e_lambda`` as a float, or raise ValueError unless it is a finite number
    >= ``E_LAMBDA_MIN`` (the smallest normal float32: SimAM computes in float32, where a
    smaller lambda is a subnormal or 0 and 4 * (v + lambda) loses it)."""
    return check_lambda(e_lambda, "e_lambda", f"e_lambda={e_lambda!r}")


def _check_shape(x: Tensor) -> None:
    if x.dim() != 4:
        raise ValueError(f"SimAM expects a 4-D input (N, C, H, W), got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if h * w < 2:
        raise ValueError(
            f"input is too small for SimAM: it needs H*W >= 2 neurons per channel, got {h}x{w}"
        )


def simam_reference(x: Tensor, e_lambda: float | Tensor) -> Tensor:
    """SimAM as the official code writes it, in PyTorch operations (any device and dtype).

    Mean, variance and the division run in float32 when ``x`` is float16 or bfloat16
    (as under autocast); the result has the dtype of ``x``.
    """
    if not isinstance(e_lambda, Tensor):
        e_lambda = check_e_lambda(e_lambda)
    _check_shape(x)
    n = x.shape[-2] * x.shape[-1] - 1
    xf = x.float() if x.dtype in _LOW_PRECISION else x
    d = (xf - xf.mean(dim=(2, 3), keepdim=True)).square()
    v = d.sum(dim=(2, 3), keepdim=True) / n
    y = d / (4 * (v + e_lambda)) + 0.5
    return (xf * torch.sigmoid(y)).to(x.dtype)


def _layout(x: Tensor) -> int | None:
    """1: channels last, 0: NCHW contiguous, None: neither (the kernel does not take it)."""
    if x.is_contiguous():
        return 0
    if x.is_contiguous(memory_format=torch.channels_last):
        return 1
    return None


class _SimAMFunction(torch.autograd.Function):
    """The CPU kernel: forward keeps x and the per-plane mean and 1/(4(v+lambda))."""

    @staticmethod
    def forward(ctx, x: Tensor, lam: Tensor) -> Tensor:  # lam: float32 (C,)
        kernel = cpu_kernel()
        b, c, h, w = x.shape
        channels_last = _layout(x)
        out = torch.empty_like(x)
        mu = x.new_empty(b, c)
        inv = x.new_empty(b, c)
        kernel.simam_forward(x.data_ptr(), out.data_ptr(), mu.data_ptr(), inv.data_ptr(), lam.data_ptr(), b, c,
                             h * w, channels_last, torch.get_num_threads())
        ctx.save_for_backward(x, mu, inv)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        x, mu, inv = ctx.saved_tensors
        fmt = torch.channels_last if _layout(x) == 1 else torch.contiguous_format
        grad = grad.contiguous(memory_format=fmt)
        b, c, h, w = x.shape
        gx = torch.empty_like(x)
        cpu_kernel().simam_backward(x.data_ptr(), grad.data_ptr(), mu.data_ptr(), inv.data_ptr(), gx.data_ptr(),
                                    b, c, h * w, _layout(x), torch.get_num_threads())
        return gx, None


def _lambda_fits(e_lambda: float | Tensor, channels: int) -> bool:
    """Whether lambda is one number or one per channel (what the kernels take)."""
    return (not isinstance(e_lambda, Tensor) or e_lambda.numel() == 1
            or tuple(e_lambda.shape) in ((channels,), (1, channels, 1, 1)))


def _per_channel(e_lambda: float | Tensor, channels: int) -> Tensor | None:
    """Lambda as a float32 (C,) tensor, where it is one number or one per channel."""
    if not _lambda_fits(e_lambda, channels):
        return None
    if not isinstance(e_lambda, Tensor):
        return torch.full((channels,), e_lambda, dtype=torch.float32)
    return e_lambda.detach().to("cpu", torch.float32).reshape(-1).expand(channels).contiguous()


def simam(x: Tensor, e_lambda: float | Tensor) -> Tensor:
    """Functional SimAM.

    ``e_lambda`` is a Python number (checked) or a tensor that broadcasts against
    (N, C, 1, 1), such as one lambda per channel (shape (C,) is taken as (1, C, 1, 1)) for
    stacked models that each have their own lambda. A tensor is not checked here: that
    would need a host sync on a GPU.

    float32 CPU inputs in NCHW or channels-last layout run the fused CPU kernel; anything
    else (GPU, float64, low precision, other strides, under torch.compile) runs
    :func:`simam_reference`.
    """
    if not isinstance(e_lambda, Tensor):
        e_lambda = check_e_lambda(e_lambda)
    _check_shape(x)
    lam = None
    if (x.device.type == "cpu" and x.dtype == torch.float32 and _layout(x) is not None and x.numel() > 0
            and not torch.compiler.is_compiling() and cpu_kernel() is not None):
        lam = _per_channel(e_lambda, x.shape[1])
    if lam is None:
        if isinstance(e_lambda, Tensor) and e_lambda.dim() == 1 and e_lambda.numel() == x.shape[1] > 1:
            e_lambda = e_lambda.view(1, -1, 1, 1)
        return simam_reference(x, e_lambda)
    return _SimAMFunction.apply(x, lam)


class _SimAMBatchNormFunction(torch.autograd.Function):
    """SimAM then training-mode BatchNorm, fused on the CPU (channels last): SimAM's output is
    never stored, both directions recompute it from x. One C call each way, which also
    updates BatchNorm's running statistics."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, lam: Tensor, bn: nn.BatchNorm2d):
        b, c, h, w = x.shape
        y = torch.empty_like(x)
        plane = x.new_empty(2, b, c)  # per-plane mu and 1 / (4 (var + lambda))
        scratch = torch.empty(2, b, c, dtype=torch.float64)
        saved = torch.empty(2, c, dtype=torch.float64)  # batch mean, 1 / sqrt(var + eps)
        cpu_kernel().simbn_forward(x.data_ptr(), y.data_ptr(), plane[0].data_ptr(), plane[1].data_ptr(),
                                   lam.data_ptr(), weight.data_ptr(), bias.data_ptr(), bn.running_mean.data_ptr(),
                                   bn.running_var.data_ptr(), bn.momentum, bn.eps, scratch.data_ptr(),
                                   saved.data_ptr(), b, c, h * w, torch.get_num_threads())
        ctx.save_for_backward(x, plane, weight, saved)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy: Tensor):
        x, plane, weight, saved = ctx.saved_tensors
        b, c, h, w = x.shape
        gy = gy.contiguous(memory_format=torch.channels_last)
        gx = torch.empty_like(x)
        grads = weight.new_empty(2, c)
        scratch = torch.empty(2, b, c, dtype=torch.float64)
        cpu_kernel().simbn_backward_full(x.data_ptr(), plane[0].data_ptr(), plane[1].data_ptr(), gy.data_ptr(),
                                         weight.data_ptr(), saved.data_ptr(), scratch.data_ptr(), gx.data_ptr(),
                                         grads[0].data_ptr(), grads[1].data_ptr(), b, c, h * w,
                                         torch.get_num_threads())
        return gx, grads[0], grads[1], None, None


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


class SimAMBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d after an attention layer, as one layer: ``bn2(attn(x))`` of every residual
    block. A BatchNorm2d in all else (its parameters, buffers and state dict keys); it owns no
    attention: the block passes its own (``forward(x, attention)``), and keeps it as its layer.

    SimAM then this BatchNorm on the CPU in training run as one fused kernel where
    :meth:`_fusable` says they can: SimAM's output is never stored, both directions recompute
    it (the same equations, less memory traffic). Anywhere else the two layers run in turn.
    """

    def forward(self, x: Tensor, attention: nn.Module | None = None) -> Tensor:
        if attention is None:
            return super().forward(x)
        if not self._fusable(x, attention):
            return super().forward(attention(x))
        lam = _per_channel(attention.e_lambda, x.shape[1])
        y = _SimAMBatchNormFunction.apply(x, self.weight, self.bias, lam, self)
        self.num_batches_tracked.add_(1)  # as BatchNorm2d counts its batches
        return y

    def _fusable(self, x: Tensor, attention: nn.Module) -> bool:
        """Whether the kernel computes ``attention`` then this layer on ``x``: a SimAM (one lambda,
        or one per channel), both training, this layer's statistics the kernel's kind, ``x`` a
        float32 channels-last CPU batch, eager PyTorch (not torch.compile) and the kernel built."""
        return (isinstance(attention, SimAM) and attention.training and self._kernel_statistics()
                and _kernel_input(x) and _lambda_fits(attention.e_lambda, x.shape[1])
                and not torch.compiler.is_compiling() and cpu_kernel() is not None)

    def _kernel_statistics(self) -> bool:
        """Training-mode BatchNorm with float32 affine weights and running statistics at a momentum."""
        return (self.training and self.track_running_stats and self.affine and self.momentum is not None
                and self.weight.dtype == torch.float32)


def _kernel_input(x: Tensor) -> bool:
    """A float32 (N, C, H, W) CPU batch in channels-last layout, H*W >= 2."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 4 and _layout(x) == 1
            and x.shape[-2] * x.shape[-1] >= 2)


def set_e_lambda(model: nn.Module, e_lambda: float) -> int:
    """Set lambda of every SimAM layer in ``model``; return how many layers were set."""
    value = check_e_lambda(e_lambda)
    layers = [m for m in model.modules() if isinstance(m, SimAM)]
    for layer in layers:
        layer.set_e_lambda(value)
    return len(layers)
