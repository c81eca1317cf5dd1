"""SimAM is exact: the paper's derivation, the official tensor form, gradients, refusals."""

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import lambda_search
import lambda_search as ls
import lambda_search.nn.kernels
import lambda_search.nn.simam
from lambda_search import SimAM, build_model, set_e_lambda, simam
from lambda_search.nn import simam as _simam


def energy(w, b, t, others, lam):
    """Eq. 2: the energy of target neuron t against the other neurons of its channel."""
    return np.mean((-1 - (w * others + b)) ** 2) + (1 - (w * t + b)) ** 2 + lam * w**2


def reference(x: torch.Tensor, lam: float) -> torch.Tensor:
    """X * sigmoid(1/E), E from Eq. 5 with mu and sigma^2 over the whole channel (float64)."""
    x = x.double()
    m = x.shape[2] * x.shape[3]
    mu = x.mean(dim=(2, 3), keepdim=True)
    var = ((x - mu) ** 2).sum(dim=(2, 3), keepdim=True) / (m - 1)
    e = 4 * (var + lam) / ((x - mu) ** 2 + 2 * var + 2 * lam)
    return x * torch.sigmoid(1 / e)


@pytest.mark.parametrize("lam", [1e-4, 0.1, 1.0])
def test_closed_form_minimises_eq2(lam):
    """Minimise Eq. 2 numerically per neuron; Eq. 3-5 must give the minimiser and its energy.

    Eq. 3 as printed has a minus sign that Eq. 2 does not support: the minimiser is
    w = +2(t - mu)/D (confirmed by the authors, ZjjConan/SimAM issue #11). The energy
    Eq. 5, the only thing SimAM computes, does not depend on that sign.
    """
    rng = np.random.default_rng(7)
    for channel in rng.normal(loc=0.3, scale=1.5, size=(3, 12)):
        for i, t in enumerate(channel):
            others = np.delete(channel, i)
            mu_t = others.mean()
            var_t = ((others - mu_t) ** 2).mean()  # over the M-1 other neurons
            result = minimize(
                lambda p: energy(p[0], p[1], t, others, lam), [0.0, 0.0],
                method="BFGS", options={"gtol": 1e-12},
            )
            w_num, b_num = result.x
            denom = (t - mu_t) ** 2 + 2 * var_t + 2 * lam
            w_t = 2 * (t - mu_t) / denom  # Eq. 3 without the printed minus sign
            b_t = -0.5 * (t + mu_t) * w_t  # Eq. 4
            e_t = 4 * (var_t + lam) / denom  # Eq. 5 with the exact mu_t, sigma_t
            assert w_num == pytest.approx(w_t, rel=1e-6, abs=1e-8)
            assert b_num == pytest.approx(b_t, rel=1e-6, abs=1e-8)
            assert result.fun == pytest.approx(e_t, rel=1e-9)
            assert energy(w_t, b_t, t, others, lam) == pytest.approx(e_t, rel=1e-12)
            # the printed sign is not a minimiser whenever t != mu_t
            assert energy(-w_t, -0.5 * (t + mu_t) * -w_t, t, others, lam) > e_t


@pytest.mark.parametrize("lam", [1e-6, 1e-4, 1e-1])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 2, 1), (3, 2, 8, 8)])
def test_module_is_x_times_sigmoid_inverse_energy(shape, lam):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 + 0.5
    expected = reference(x, lam)
    torch.testing.assert_close(SimAM(lam).double()(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(simam(x.float(), lam), expected.float(), rtol=2e-6, atol=2e-6)


def test_public_copies_with_wrong_formulas_fail_the_reference():
    """The two wrong variants found in public copies are far from the reference on this data,
    so the test above would catch either."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    lam = 0.1
    expected = reference(x, lam)
    d = (x - x.mean(dim=(2, 3), keepdim=True)) ** 2
    v = d.sum(dim=(2, 3), keepdim=True) / 15
    lambda_outside = x * torch.sigmoid(d / (4 * v + lam) + 0.5)
    summed = x * torch.sigmoid(d / (4 * (d.sum(dim=(2, 3), keepdim=True) + lam)) + 0.5)
    for wrong in (lambda_outside, summed):
        assert (wrong - expected).abs().max() > 1e-3


def test_gradcheck_float64():
    x = torch.randn(2, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    for lam in (1e-4, 0.1):
        layer = SimAM(lam).double()
        assert torch.autograd.gradcheck(layer, (x,), eps=1e-6, atol=1e-7)
        assert torch.autograd.gradgradcheck(layer, (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("lam", [1e-12, 1e-8, 1e-4])
def test_constant_channels_stay_finite(lam):
    x = torch.randn(2, 4, 6, 6)
    x[:, 0] = 0.0  # a dead channel after ReLU
    x[:, 1] = 3.0
    x.requires_grad_(True)
    out = SimAM(lam)(x)
    out.square().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    torch.testing.assert_close(out[:, 1], torch.full_like(out[:, 1], 3.0 * (1 / (1 + math.exp(-0.5)))))


@pytest.mark.parametrize("bad", [0, 0.0, -1e-4, float("nan"), float("inf"), float("-inf"), None, "1e-4", True, [1e-4]])
def test_refuses_lambda_that_is_not_a_finite_positive_number(bad):
    with pytest.raises(ValueError, match=r"e_lambda must be a finite number > 0, got e_lambda=") as info:
        SimAM(bad)
    assert repr(bad) in str(info.value)
    with pytest.raises(ValueError, match="e_lambda"):
        simam(torch.randn(1, 1, 2, 2), bad)
    with pytest.raises(ValueError, match="e_lambda"):
        set_e_lambda(SimAM(), bad)
    with pytest.raises(ValueError, match="e_lambda"):
        build_model("resnet20", 10, e_lambda=bad)


def test_refuses_inputs_too_small_for_simam():
    with pytest.raises(ValueError, match=r"too small for SimAM.*1x1"):
        SimAM()(torch.randn(2, 3, 1, 1))
    with pytest.raises(ValueError, match="4-D"):
        SimAM()(torch.randn(3, 4, 4))
    SimAM()(torch.randn(2, 3, 1, 2))  # two neurons per channel is enough


def test_autocast_keeps_statistics_in_float32():
    """Channels with a large mean and a small spread: bfloat16 statistics lose them."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(4, 8, 8, 8, generator=g) * 0.05 + 4.0).bfloat16()
    lam = 1e-4
    expected = reference(x, lam)  # float64 from the same bfloat16 values
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = SimAM(lam)(x)
    assert out.dtype == torch.bfloat16
    ours = (out.double() - expected).abs().max().item()
    # the same formula run in bfloat16 throughout
    d = (x - x.mean(dim=(2, 3), keepdim=True)) ** 2
    v = d.sum(dim=(2, 3), keepdim=True) / 63
    naive = (x * torch.sigmoid(d / (4 * (v + lam)) + 0.5)).double()
    naive_err = (naive - expected).abs().max().item()
    rounding = expected.abs().max().item() * 2**-8  # one bfloat16 rounding of the output
    assert ours <= rounding
    assert naive_err > 4 * rounding


def test_lambda_is_a_non_persistent_buffer_changed_in_place():
    layer = SimAM(1e-4)
    assert len(list(layer.parameters())) == 0
    assert layer.state_dict() == {}
    assert dict(layer.named_buffers())["e_lambda"].item() == pytest.approx(1e-4)
    storage = layer.e_lambda.data_ptr()
    model = build_model("resnet20", 10, e_lambda=1e-4)
    assert set_e_lambda(model, 0.1) == 9  # one SimAM per residual block
    assert all(m.e_lambda.item() == pytest.approx(0.1) for m in model.modules() if isinstance(m, SimAM))
    layer.set_e_lambda(0.5)
    assert layer.e_lambda.data_ptr() == storage and layer.e_lambda.item() == 0.5
    assert "e_lambda=0.5" in repr(layer)


def test_functional_form_takes_one_lambda_per_sample():
    """A lambda tensor broadcasts over (N, C, 1, 1): stacked models, each with its own lambda."""
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    lams = [1e-6, 1e-3, 1.0]
    out = simam(x, torch.tensor(lams, dtype=torch.float64).view(3, 1, 1, 1))
    for i, lam in enumerate(lams):
        torch.testing.assert_close(out[i : i + 1], reference(x[i : i + 1], lam), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- the CPU kernel

kernel = pytest.mark.skipif(lambda_search.nn.kernels.cpu_kernel() is None, reason="no C compiler for the CPU kernel")


@kernel
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", [(4, 16, 32, 32), (3, 5, 7, 9), (8, 64, 8, 8), (2, 3, 2, 1), (2, 24, 4, 4)])
@pytest.mark.parametrize("lam", [1e-8, 1e-4, 0.1, 10.0])
def test_cpu_kernel_matches_float64_reference(shape, lam, channels_last):
    """Forward and closed-form backward of the float32 kernel against autograd through the
    float64 reference: within a few float32 roundings."""
    g = torch.Generator().manual_seed(5)
    x64 = torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 0.7
    x64[0, 0] = 1.5  # a constant plane: zero variance
    grad = torch.randn(shape, generator=g, dtype=torch.float64)
    x64.requires_grad_(True)
    expected = reference(x64, lam)
    (expected_grad,) = torch.autograd.grad(expected, x64, grad)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x64.detach().float().contiguous(memory_format=fmt).requires_grad_(True)
    out = simam(x, lam)
    assert out.grad_fn is not None and type(out.grad_fn).__name__ == "_SimAMFunctionBackward"
    assert out.is_contiguous(memory_format=fmt)
    (x_grad,) = torch.autograd.grad(out, x, grad.float())
    torch.testing.assert_close(out.double(), expected.detach(), rtol=2e-6, atol=2e-6 * expected.abs().max().item())
    scale = expected_grad.abs().max().item()
    torch.testing.assert_close(x_grad.double(), expected_grad, rtol=1e-5, atol=2e-6 * scale)


@kernel
def test_cpu_kernel_takes_a_lambda_per_channel_and_falls_back_elsewhere():
    x = torch.randn(3, 4, 5, 5, requires_grad=True)
    lams = torch.tensor([1e-6, 1e-3, 1e-1, 1.0], dtype=torch.float64)
    for lam_shape in [(4,), (1, 4, 1, 1)]:
        out = simam(x, lams.view(lam_shape))
        assert type(out.grad_fn).__name__ == "_SimAMFunctionBackward"
        for c, lam in enumerate(lams.tolist()):
            torch.testing.assert_close(
                out[:, c : c + 1].double(), reference(x[:, c : c + 1], lam), rtol=2e-6, atol=2e-6
            )
    # one lambda per sample (N, 1, 1, 1) is not per channel, even where N == C: the reference runs
    x4 = torch.randn(4, 4, 3, 3)
    per_sample = torch.tensor([1e-6, 1e-3, 1e-1, 1.0]).view(4, 1, 1, 1)
    torch.testing.assert_close(simam(x4, per_sample), _simam.simam_reference(x4, per_sample))
    # strides the kernel does not take (a transposed view) run the reference
    xt = torch.randn(2, 3, 6, 5).transpose(2, 3)
    torch.testing.assert_close(simam(xt, 1e-4), _simam.simam_reference(xt, 1e-4))


def test_without_the_kernel_simam_is_the_reference(monkeypatch):
    monkeypatch.setattr(lambda_search.nn.simam, "cpu_kernel", lambda: None)
    x = torch.randn(2, 3, 4, 4, requires_grad=True)
    out = simam(x, 1e-4)
    assert type(out.grad_fn).__name__ != "_SimAMFunctionBackward"
    torch.testing.assert_close(out, _simam.simam_reference(x, 1e-4), rtol=0, atol=0)


@kernel
@pytest.mark.parametrize("shape, lam", [((8, 16, 32, 32), 1e-4), ((4, 32, 8, 8), 0.1), ((3, 64, 2, 2), 1e-4),
                                        ((5, 24, 7, 5), 3.0), ((4, 6, 5, 5), "per channel")])
def test_simam_then_batch_norm_fused_matches_float64(shape, lam):
    """SimAMBatchNorm, every residual block's bn2: fused with SimAM on the CPU in training."""
    torch.manual_seed(0)
    c = shape[1]
    x = (torch.randn(shape) * 2 + 0.5).contiguous(memory_format=torch.channels_last).requires_grad_()
    bn = _simam.SimAMBatchNorm(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
    bn64 = torch.nn.BatchNorm2d(c).double()
    bn64.load_state_dict(bn.state_dict())
    attn = ls.SimAM(1e-4 if lam == "per channel" else lam)
    lam64 = torch.logspace(-4, 1, c, dtype=torch.float64).view(1, c, 1, 1) if lam == "per channel" else lam
    if lam == "per channel":
        attn.e_lambda = lam64.view(c).float()  # one lambda per channel, as in a pack
    g = torch.randn(shape).contiguous(memory_format=torch.channels_last)
    assert bn._fusable(x, attn)
    y = bn(x, attn)
    y.backward(g)
    x64 = x.detach().double().requires_grad_()
    y64 = bn64(_simam.simam_reference(x64, lam64))
    y64.backward(g.double())
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=0, atol=1e-5 * x64.grad.abs().max().item())
    for a, b in ((bn.weight.grad, bn64.weight.grad), (bn.bias.grad, bn64.bias.grad)):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5 * b.abs().max().item())
    torch.testing.assert_close(bn.running_mean.double(), bn64.running_mean, rtol=0, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), bn64.running_var, rtol=1e-6, atol=1e-6)
    assert bn.num_batches_tracked.item() == 1


def test_simam_then_batch_norm_elsewhere_is_the_two_modules():

    class Formula(torch.nn.Module):  # another attention layer, with a lambda all the same
        e_lambda = torch.tensor(1e-3)

        def forward(self, x):
            return _simam.simam_reference(x, 1e-3)

    x = torch.randn(2, 4, 6, 6)  # NCHW: not fused
    attn, bn = ls.SimAM(1e-3), _simam.SimAMBatchNorm(4)
    twin = torch.nn.BatchNorm2d(4)
    twin.load_state_dict(bn.state_dict())
    assert not bn._fusable(x, attn)
    assert torch.equal(bn(x, attn), twin(attn(x)))
    assert torch.equal(bn.running_var, twin.running_var)
    assert bn.state_dict().keys() == twin.state_dict().keys()
    last = x.contiguous(memory_format=torch.channels_last)
    for other in (Formula(), torch.nn.Identity()):  # only SimAM is fused
        assert not bn._fusable(last, other)
        assert torch.equal(bn(last, other), twin(other(last)))
    assert not bn._fusable(last.double(), attn)
    assert torch.equal(bn(last), twin(last))  # no attention: a BatchNorm2d
    attn.eval(), bn.eval(), twin.eval()  # evaluation: not fused
    assert not bn._fusable(last, attn)
    assert torch.equal(bn(last, attn), twin(attn(last)))


def test_refuses_lambda_below_the_smallest_normal_float32():
    # issue 14: below it lambda is a subnormal or 0 in float32, and 4 * (v + lambda) loses it
    floor = lambda_search.nn.simam.E_LAMBDA_MIN
    assert floor == float(torch.finfo(torch.float32).tiny) == 1.1754943508222875e-38
    for bad in (1e-50, 1e-39, 5e-324, math.nextafter(floor, 0.0)):
        message = (f"e_lambda must be >= 1.1754943508222875e-38 (the smallest normal float32: SimAM computes "
                   f"in float32), got e_lambda={bad!r}")
        for build in (SimAM, lambda v: set_e_lambda(SimAM(), v), lambda v: simam(torch.randn(1, 1, 2, 2), v),
                      lambda v: build_model("resnet20", 10, e_lambda=v)):
            with pytest.raises(ValueError) as info:
                build(bad)
            assert str(info.value) == message
    assert _simam.check_e_lambda(floor) == floor
    x = torch.randn(2, 3, 4, 4)
    x[:, 0] = 0.0  # a dead channel: 0 / (4 * floor) stays 0, as it would not with lambda lost to 0
    out = SimAM(floor)(x)
    assert torch.isfinite(out).all()
