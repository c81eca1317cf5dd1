"""The other networks of the paper's Table 2 (PreResNet-20/56/110, WideResNet-28x10/40x10,
MobileNetV2) and the official code's bottleneck ResNet-164 / PreResNet-164: the official
code's exact sizes, SimAM where it puts it, their smallest input, and the models command.
The big networks are built on the meta device only (never allocated)."""

import pytest
import torch

import lambda_search as ls
from lambda_search.cli import main
from lambda_search.nn import registry
from lambda_search.nn.registry import NETWORKS, build_model
from lambda_search.train import plan as _plan

TABLE2 = ("preresnet20", "preresnet56", "preresnet110", "preresnet164", "wideresnet28x10", "wideresnet40x10",
          "mobilenetv2", "resnet164")
# the official SimAM code's parameter counts (SPEC.md section 7), 10 / 100 classes
COUNTS = {
    "preresnet20": (272_282, 278_132), "preresnet56": (855_578, 861_428), "preresnet110": (1_730_522, 1_736_372),
    "wideresnet28x10": (36_479_194, 36_536_884), "wideresnet40x10": (55_841_754, 55_899_444),
    "mobilenetv2": (2_296_922, 2_412_212), "resnet164": (1_704_154, 1_727_284),
    "preresnet164": (1_703_258, 1_726_388),
}
# the channels of the tensor each SimAM sees, in order: the block's width after its second (3x3) convolution,
# MobileNetV2's expanded planes after its depthwise convolution
PRE_20 = [16] * 3 + [32] * 3 + [64] * 3
MOBILENET = [32, 96, 144, 144, 192, 192, 192, 384, 384, 384, 384, 576, 576, 576, 960, 960, 960]


def meta(name, classes=10, attention="simam"):
    with torch.device("meta"):
        return build_model(name, classes, attention)


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", list(COUNTS))
def test_parameter_counts_are_the_official_codes_and_simam_adds_nothing(name):
    for classes, expected in zip((10, 100), COUNTS[name]):
        simam, baseline = meta(name, classes), meta(name, classes, "none")
        assert n_params(simam) == n_params(baseline) == expected
        assert simam.state_dict().keys() == baseline.state_dict().keys()  # SimAM: no parameter, no state
        assert all(p.device.type == "meta" for p in simam.parameters())


def _simam_inputs(model, x):
    """(channels, H, W) of what each SimAM sees, in call order, and whether each sees the
    output of the convolution called just before it (its block's conv2)."""
    seen, last_conv, after_conv = [], {}, []

    def at_simam(module, inputs, output):
        seen.append(tuple(inputs[0].shape[1:]))
        after_conv.append(inputs[0] is last_conv.get("out"))

    for module in model.modules():
        if isinstance(module, ls.SimAM):
            module.register_forward_hook(at_simam)
        elif isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(lambda m, i, o: last_conv.update(out=o))
    logits = model(x)
    return seen, after_conv, logits


def test_simam_sits_after_each_pre_activation_blocks_conv2():
    model = build_model("preresnet20", 10)
    assert [n for n, _ in model.layer2[0].named_children()] == ["relu", "bn1", "conv1", "bn2", "conv2", "attn",
                                                                 "shortcut"]
    seen, after_conv, _ = _simam_inputs(model, torch.randn(2, 3, 8, 8))
    assert [c for c, _, _ in seen] == PRE_20 and all(after_conv)
    assert [h for _, h, _ in seen] == [8] * 3 + [4] * 3 + [2] * 3
    blocks = [m for m in model.modules() if hasattr(m, "attn")]
    assert all(isinstance(b.attn, ls.SimAM) and b.conv2.out_channels == c for b, c in zip(blocks, PRE_20))
    assert isinstance(model.layer2[0].shortcut[0], torch.nn.Conv2d) and len(model.layer2[0].shortcut) == 1  # no BN
    assert not any(isinstance(m, ls.SimAM) for m in build_model("preresnet20", 10, "none").modules())


def test_simam_sits_after_each_depthwise_convolution_of_mobilenetv2():
    model = build_model("mobilenetv2", 10)
    seen, after_conv, _ = _simam_inputs(model, torch.randn(2, 3, 16, 16))
    assert [c for c, _, _ in seen] == MOBILENET and all(after_conv)
    # the stride-1 stem and second stage: 16 px until the third stage, then 8, 4 and 2
    assert [h for _, h, _ in seen] == [16] * 3 + [8] * 3 + [4] * 7 + [2] * 4
    depthwise = [b.conv2 for b in model.layers]
    assert all(c.groups == c.in_channels == c.out_channels == ch for c, ch in zip(depthwise, MOBILENET))


@pytest.mark.parametrize("name, blocks, widths", [("wideresnet28x10", 4, (160, 320, 640)),
                                                  ("wideresnet40x10", 6, (160, 320, 640))])
def test_simam_sits_after_each_wide_blocks_conv2(name, blocks, widths):
    model = meta(name)  # shapes only: the meta device computes none
    seen, after_conv, logits = _simam_inputs(model, torch.empty(2, 3, 32, 32, device="meta"))
    assert seen == [(w, s, s) for w, s in zip(widths, (32, 16, 8)) for _ in range(blocks)] and all(after_conv)
    assert logits.shape == (2, 10)
    assert model.block1.layer[0].droprate == 0.3  # the official default


@pytest.mark.parametrize("name", ["preresnet20", "mobilenetv2"])
def test_a_forward_gives_logits_at_32_px_and_at_the_smallest_input(name):
    model = build_model(name, 100)
    for size in (32, NETWORKS[name].min_input):
        assert model(torch.randn(2, 3, size, size)).shape == (2, 100)
    assert model.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 100)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_min_input_is_the_smallest_side_every_simam_takes(name):
    """At min_input every SimAM map has 2x2 px or more; one px less, one has 1x1 and SimAM refuses."""
    model, size = meta(name), NETWORKS[name].min_input
    assert model(torch.empty(2, 3, size, size, device="meta")).shape == (2, 10)
    with pytest.raises(ValueError, match="too small for SimAM"):
        model(torch.empty(2, 3, size - 1, size - 1, device="meta"))


def test_the_table2_networks_are_registered_with_the_papers_labels():
    assert {name: NETWORKS[name].label for name in TABLE2} == {
        "preresnet20": "PreResNet-20", "preresnet56": "PreResNet-56", "preresnet110": "PreResNet-110",
        "preresnet164": "PreResNet-164", "wideresnet28x10": "WideResNet-28x10",
        "wideresnet40x10": "WideResNet-40x10", "mobilenetv2": "MobileNetV2", "resnet164": "ResNet-164"}
    assert not any(NETWORKS[name].packs for name in TABLE2)  # the packed trainer knows BasicBlock ResNets only
    assert {name: NETWORKS[name].options for name in TABLE2 if NETWORKS[name].options} == \
           {"resnet164": {"shortcut": ("B",)}}
    with pytest.raises(ValueError, match="shortcut='A' is not an option of mobilenetv2, which has none"):
        build_model("mobilenetv2", 10, shortcut="A")


@pytest.mark.parametrize("name, size, smallest", [("mobilenetv2", 8, 9), ("preresnet20", 4, 5),
                                                  ("wideresnet28x10", 4, 5)])
def test_a_network_below_its_smallest_input_is_refused_by_the_plan(tiny_config, name, size, smallest):
    config = ls.load_config(tiny_config(), [f"model.name='{name}'", f"data.options.image_size={size}"])
    with pytest.raises(ls.ConfigError, match=f"model.name='{name}' needs images of at least {smallest} px, "
                                             f"the data set has {size} px"):
        _plan.make_plan(config)
    plan = _plan.make_plan(ls.load_config(tiny_config(), [f"model.name='{name}'",
                                                          f"data.options.image_size={smallest}"]))
    assert plan.train.pack == 1  # does not pack: one fold at a time


def test_models_lists_every_network_counted_on_the_meta_device(capsys, monkeypatch):
    devices = []
    real = registry.build_model

    def build(*args, **kwargs):
        model = real(*args, **kwargs)
        devices.append(next(model.parameters()).device.type)
        return model

    monkeypatch.setattr(registry, "build_model", build)
    assert main(["models", "--num-classes", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "shortcut", "classes", "parameters"]
    rows = {(r.split()[0], r.split()[1]): r.split()[3] for r in lines[1:]}
    assert {name for name, _ in rows} == set(NETWORKS) and set(devices) == {"meta"}
    for name, (count, _) in COUNTS.items():
        assert rows[(name, "B" if name == "resnet164" else "-")] == f"{count:,}"
    assert rows[("resnet20", "B")] == "272,474" and rows[("resnet20", "A")] == "269,722"
