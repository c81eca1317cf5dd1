"""The paper's networks: exact sizes, SimAM where the official code puts it, shapes."""

import pytest
import torch
import torchvision

import lambda_search
from lambda_search import MODEL_NAMES, SimAM, build_model
from lambda_search.nn import resnet as _models
from lambda_search.nn import simam as _simam


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "shortcut, classes, expected",
    [("A", 10, 269_722), ("A", 100, 275_572), ("B", 10, 272_474), ("B", 100, 278_324)],
)
def test_resnet20_parameter_counts_of_the_spec(shortcut, classes, expected):
    for attention in ("simam", "none"):  # SimAM adds no parameters
        assert n_params(build_model("resnet20", classes, attention, shortcut=shortcut)) == expected


def test_resnet18_has_torchvisions_parameters():
    assert n_params(build_model("resnet18", 1000)) == 11_689_512
    assert n_params(build_model("resnet18", 1000, attention="none")) == 11_689_512


@pytest.mark.parametrize(
    "name, blocks", [("resnet20", 3), ("resnet32", 5), ("resnet44", 7), ("resnet56", 9), ("resnet110", 18)]
)
def test_cifar_depths(name, blocks):
    model = build_model(name, 100)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert len(convs) == 1 + 2 * 3 * blocks  # stem + two per block: depth = 6n + 2 with the fc
    assert sum(isinstance(m, SimAM) for m in model.modules()) == 3 * blocks
    assert not any(isinstance(m, SimAM) for m in build_model(name, 100, "none").modules())


def test_resnet18_baseline_is_torchvision_resnet18():
    """Same names, shapes and function: torchvision's weights load and give the same logits."""
    ours = build_model("resnet18", 1000, attention="none").eval()
    theirs = torchvision.models.resnet18(num_classes=1000).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 112, 112)
    torch.testing.assert_close(ours(x), theirs(x))


def test_simam_sits_between_conv2_and_bn2_of_every_block():
    model = build_model("resnet20", 10, shortcut="A")
    order = []
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.BatchNorm2d, SimAM)):
            module.register_forward_hook(lambda m, i, o, name=name: order.append(name))
    model(torch.randn(2, 3, 8, 8))
    block = ["conv1", "bn1", "conv2", "attn", "bn2"]
    expected = ["conv1", "bn1"] + [f"layer{s}.{b}.{part}" for s in (1, 2, 3) for b in range(3) for part in block]
    assert order == expected


def test_shortcuts():
    b = build_model("resnet20", 10, shortcut="B")
    a = build_model("resnet20", 10, shortcut="A")
    for stage in ("layer2", "layer3"):
        proj = getattr(b, stage)[0].downsample
        assert isinstance(proj[0], torch.nn.Conv2d) and proj[0].kernel_size == (1, 1) and proj[0].stride == (2, 2)
        assert isinstance(proj[1], torch.nn.BatchNorm2d)
        assert n_params(getattr(a, stage)[0].downsample) == 0
    assert isinstance(b.layer1[0].downsample, torch.nn.Identity)
    # type A: subsample by 2, the input's channels in the middle of the zero-padded output
    x = torch.randn(2, 16, 8, 8)
    out = a.layer2[0].downsample(x)
    assert out.shape == (2, 32, 4, 4)
    torch.testing.assert_close(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


@pytest.mark.parametrize("name", ["resnet20", "resnet56"])
@pytest.mark.parametrize("size", [32, 16, 8])
def test_cifar_output_shapes(name, size):
    model = build_model(name, 100)
    assert model(torch.randn(2, 3, size, size)).shape == (2, 100)


@pytest.mark.parametrize("size", [112, 224])
def test_resnet18_output_shapes(size):
    model = build_model("resnet18", 1000, e_lambda=0.1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 1000)


def test_input_too_small_for_simam_is_refused():
    with pytest.raises(ValueError, match="too small for SimAM"):
        build_model("resnet20", 10)(torch.randn(2, 3, 4, 4))  # the last stage is 1x1
    build_model("resnet20", 10, attention="none")(torch.randn(2, 3, 4, 4))


def test_bad_arguments_are_refused_with_the_rule_and_value():
    with pytest.raises(ValueError, match="unknown model name='resnet19'; valid names: " + ", ".join(MODEL_NAMES)
                       + ", or a network of your own as 'module:function'"):
        build_model("resnet19", 10)
    with pytest.raises(ValueError, match="attention must be one of simam, none, got attention='se'"):
        build_model("resnet20", 10, attention="se")
    with pytest.raises(ValueError, match="shortcut must be 'B' or 'A', got shortcut='C'"):
        build_model("resnet20", 10, shortcut="C")
    with pytest.raises(ValueError, match="shortcut must be 'B', got shortcut='A' \\(resnet18\\)"):
        build_model("resnet18", 10, shortcut="A")
    for bad in (0, -3, 2.5, "10", True):
        with pytest.raises(ValueError, match="num_classes must be an integer >= 1"):
            build_model("resnet20", bad)


def test_lambda_reaches_every_simam_layer():
    model = build_model("resnet32", 10, e_lambda=3e-5)
    values = {m.e_lambda.item() for m in model.modules() if isinstance(m, SimAM)}
    assert values == {3e-5}


def test_a_blocks_layers_and_state_dict_are_a_plain_blocks():
    # bn2 is the layer that takes the attention before it (and may fuse the two): still a
    # BatchNorm2d by its names and state, so checkpoints and the official mapping hold
    model = build_model("resnet20", 10)
    block = model.layer2[0]
    assert [n for n, _ in block.named_children()] == ["conv1", "bn1", "relu", "conv2", "attn", "bn2", "downsample"]
    assert isinstance(block.attn, SimAM) and isinstance(block.bn2, _simam.SimAMBatchNorm)
    assert isinstance(block.bn2, torch.nn.BatchNorm2d)
    assert [k for k in block.state_dict() if k.startswith(("attn", "bn2"))] == \
           [f"bn2.{k}" for k in torch.nn.BatchNorm2d(32).state_dict()]
    assert model.state_dict().keys() == build_model("resnet20", 10, attention="none").state_dict().keys()


@pytest.mark.skipif(lambda_search.nn.kernels.cpu_kernel() is None, reason="no C compiler for the CPU kernel")
def test_a_block_fuses_simam_and_bn2_where_the_layer_says(monkeypatch):
    fused = []
    real = _simam._SimAMBatchNormFunction.apply
    monkeypatch.setattr(_simam._SimAMBatchNormFunction, "apply", lambda *a: fused.append(1) or real(*a))
    block = _models.BasicBlock(8, 8, attn_layer=SimAM)
    x = torch.randn(4, 8, 6, 6)
    block(x.contiguous(memory_format=torch.channels_last))  # CPU training, float32, channels last
    assert len(fused) == 1 and block.bn2.num_batches_tracked.item() == 1
    block(x)  # NCHW: the two layers in turn
    block.eval()(x.contiguous(memory_format=torch.channels_last))
    _models.BasicBlock(8, 8).train()(x.contiguous(memory_format=torch.channels_last))  # no attention
    assert len(fused) == 1
