"""load_official_checkpoint for each family of the official SimAM code's CIFAR networks: a
checkpoint named as the official code names it (its key names, SimAM wrapping a block's
convolution as Sequential(conv, SimAM), a DataParallel "module." prefix, the FLOP counter's
entries) loads strictly, gives the logits of the network it was saved from, and is refused by
a network that differs on SimAM. The official names are written out here, family by family,
not taken from the package. The real-size WideResNets are checked on the meta device."""

import re

import pytest
import torch

from lambda_search import build_model, load_official_checkpoint
from lambda_search.nn.official import map_official_state_dict, official_simam
from lambda_search.nn.simam import SimAM
from lambda_search.nn.wideresnet import WideResNet

# our key -> the official code's, per family: (pattern, replacement) applied in order
OFFICIAL_NAMES = {
    "resnet": [(r"^(layer\d\.\d+)\.downsample\.", r"\1.shortcut."), (r"^fc\.", "linear.")],
    "preresnet": [],  # our names are the official code's (shortcut.0, bn, linear)
    "wideresnet": [],  # (blockN.layer.M..., convShortcut, bn1, fc)
    "mobilenetv2": [],  # (layers.M..., shortcut.0/1, conv2 and bn2 to 1280, linear)
}
# with SimAM, the official code wraps this convolution of each block as Sequential(conv, SimAM): our key -> its
SIMAM_WRAPPED = {
    "resnet": (r"^(layer\d\.\d+)\.conv2\.weight$", r"\1.conv2.0.weight"),
    "preresnet": (r"^(layer\d\.\d+)\.conv2\.weight$", r"\1.conv2.0.weight"),
    "wideresnet": (r"^(block\d\.layer\.\d+)\.conv2\.weight$", r"\1.conv2.0.weight"),
    "mobilenetv2": (r"^(layers\.\d+)\.conv2\.weight$", r"\1.conv2.0.weight"),  # (not the network's own conv2)
}
# a few keys of each network's official checkpoint, as the official code names them (with SimAM)
SOME_OFFICIAL_KEYS = {
    "resnet20": ["layer2.0.shortcut.1.running_var", "layer3.2.conv2.0.weight", "linear.bias"],
    "resnet164": ["layer1.0.shortcut.0.weight", "layer3.17.conv2.0.weight", "layer3.17.bn3.weight", "linear.weight"],
    "preresnet20": ["layer2.0.shortcut.0.weight", "layer1.2.conv2.0.weight", "bn.running_mean", "linear.weight"],
    "preresnet164": ["layer1.0.shortcut.0.weight", "layer3.17.conv2.0.weight", "layer3.17.bn3.bias", "bn.weight"],
    "wideresnet10x1": ["block2.layer.0.convShortcut.weight", "block3.layer.0.conv2.0.weight", "bn1.weight",
                       "fc.bias"],
    "mobilenetv2": ["layers.1.shortcut.1.running_mean", "layers.16.conv2.0.weight", "conv2.weight", "bn2.weight",
                    "linear.weight"],
}
NETWORKS = {  # name: (family, builder(attention)), the smallest of each family and block
    "resnet20": ("resnet", lambda attention: build_model("resnet20", 10, attention)),
    "resnet164": ("resnet", lambda attention: build_model("resnet164", 10, attention)),
    "preresnet20": ("preresnet", lambda attention: build_model("preresnet20", 10, attention)),
    "preresnet164": ("preresnet", lambda attention: build_model("preresnet164", 10, attention)),
    "wideresnet10x1": ("wideresnet", lambda attention: WideResNet(10, 1, 10, SimAM if attention == "simam" else None)),
    "mobilenetv2": ("mobilenetv2", lambda attention: build_model("mobilenetv2", 10, attention)),
}


def official_key(key, family, simam):
    for pattern, replacement in OFFICIAL_NAMES[family]:
        key = re.sub(pattern, replacement, key)
    return re.sub(*SIMAM_WRAPPED[family], key) if simam else key


def official_checkpoint(model, family, simam):
    """``model``'s state dict as the official training saves it: official names, "module."
    prefixed, and the FLOP counter's (thop's) entries on the network, each container and each
    SimAM (and its sigmoid), as in the official checkpoints."""
    state = {official_key(k, family, simam): v.clone() for k, v in model.state_dict().items()}
    modules = {""} | {".".join(k.split(".")[:i]) for k in state for i in range(1, k.count("."))}
    modules |= {k[: -len("0.weight")] + s for k in state if k.endswith(".conv2.0.weight") for s in ("1", "1.activaton")}
    counter = torch.zeros(1, dtype=torch.float64)
    for module in modules:
        for name in ("total_ops", "total_params"):
            state[f"{module}.{name}".lstrip(".")] = counter.clone()
    return {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}


def with_statistics(model):
    """``model`` in eval mode, its BatchNorms' statistics and weights other than their initial
    0s and 1s (as a trained network's)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
    return model.eval()


@pytest.mark.parametrize("name", list(NETWORKS))
@pytest.mark.parametrize("attention", ["simam", "none"])
def test_an_official_checkpoint_gives_the_networks_logits(tmp_path, name, attention):
    family, build = NETWORKS[name]
    torch.manual_seed(0)
    source = with_statistics(build(attention))
    checkpoint = official_checkpoint(source, family, attention == "simam")
    if attention == "simam":
        assert set(SOME_OFFICIAL_KEYS[name]) <= {k.removeprefix("module.") for k in checkpoint["state_dict"]}
    path = tmp_path / "checkpoint.pth.tar"
    torch.save(checkpoint, path)
    torch.manual_seed(1)
    fresh = build(attention).eval()
    x = torch.randn(2, 3, 9, 9, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = source(x)
        assert not torch.equal(fresh(x), expected)
        assert load_official_checkpoint(fresh, path) == {"epoch": 3, "simam": attention == "simam"}
        assert torch.equal(fresh(x), expected)


@pytest.mark.parametrize("name", list(NETWORKS))
def test_a_checkpoint_that_differs_on_simam_is_refused(tmp_path, name):
    family, build = NETWORKS[name]
    for trained_with, built in (("simam", "none"), ("none", "simam")):
        path = tmp_path / f"{trained_with}.pth.tar"
        torch.save(official_checkpoint(build(trained_with), family, trained_with == "simam"), path)
        model = build(built)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        words = "with SimAM" if trained_with == "simam" else "without SimAM"
        with pytest.raises(ValueError, match=f"was trained {words}, but the model was built with attention='{built}'"):
            load_official_checkpoint(model, path)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("name", ["wideresnet28x10", "wideresnet40x10"])
def test_the_real_size_wideresnets_load_on_the_meta_device(tmp_path, name):
    for attention in ("simam", "none"):
        with torch.device("meta"):
            model = build_model(name, 10, attention)
        checkpoint = official_checkpoint(model, "wideresnet", attention == "simam")
        assert official_simam(checkpoint["state_dict"], model) == (attention == "simam")
        mapped = map_official_state_dict(checkpoint["state_dict"], model)
        assert {k: v.shape for k, v in mapped.items()} == {k: v.shape for k, v in model.state_dict().items()}
        path = tmp_path / f"{attention}.pth.tar"
        torch.save(checkpoint, path)  # meta tensors: shapes, no data
        assert load_official_checkpoint(model, path) == {"epoch": 3, "simam": attention == "simam"}


def test_a_family_keeps_its_own_names(tmp_path):
    """An official PreResNet's shortcut is its own ("shortcut"), not mapped to the ResNets'
    "downsample"; a checkpoint of one family does not load into another's network of the same depth."""
    preresnet = build_model("preresnet20", 10, "none")
    checkpoint = official_checkpoint(preresnet, "preresnet", False)
    mapped = map_official_state_dict(checkpoint["state_dict"], preresnet)
    assert "layer2.0.shortcut.0.weight" in mapped and mapped.keys() == preresnet.state_dict().keys()
    assert "layer2.0.downsample.0.weight" in map_official_state_dict(checkpoint["state_dict"])  # (no model: ResNets')
    torch.save(checkpoint, tmp_path / "preresnet20.pth.tar")
    with pytest.raises(ValueError, match=r"does not fit this model: missing keys: .*bn1\.bias"):
        load_official_checkpoint(build_model("resnet20", 10, "none"), tmp_path / "preresnet20.pth.tar")
