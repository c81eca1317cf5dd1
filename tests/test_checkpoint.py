"""The official CIFAR-100 ResNet-20 + SimAM checkpoint loads strictly and computes what the
official network computes."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lambda_search import build_model, load_official_checkpoint
from lambda_search.nn.official import map_official_state_dict

OFFICIAL = (
    Path(__file__).resolve().parents[1] / ".." / "shared" / "reference" / "official_simam_resnet20_cifar100.pth.tar"
)

if not OFFICIAL.is_file():
    if os.environ.get("CI"):
        raise FileNotFoundError(f"the reference checkpoint is missing in CI: {OFFICIAL}")
    pytest.skip(f"no reference checkpoint at {OFFICIAL}", allow_module_level=True)


@pytest.fixture(scope="module")
def official():
    return torch.load(OFFICIAL, map_location="cpu", weights_only=True)


def official_forward(sd, x, lam):
    """The official network, written from SPEC sections 1-3 over the raw state dict:
    conv1 -> bn1 -> relu -> conv2 -> SimAM -> bn2 -> (+ shortcut) -> relu."""

    def bn(h, prefix):
        return F.batch_norm(h, sd[f"{prefix}.running_mean"], sd[f"{prefix}.running_var"],
                            sd[f"{prefix}.weight"], sd[f"{prefix}.bias"], training=False, eps=1e-5)

    def simam(h):
        n = h.shape[2] * h.shape[3] - 1
        d = (h - h.mean(dim=(2, 3), keepdim=True)).pow(2)
        v = d.sum(dim=(2, 3), keepdim=True) / n
        return h * torch.sigmoid(d / (4 * (v + lam)) + 0.5)

    out = F.relu(bn(F.conv2d(x, sd["conv1.weight"], padding=1), "bn1"))
    for stage in (1, 2, 3):
        for block in range(3):
            p = f"layer{stage}.{block}"
            stride = 2 if stage > 1 and block == 0 else 1
            h = F.relu(bn(F.conv2d(out, sd[f"{p}.conv1.weight"], stride=stride, padding=1), f"{p}.bn1"))
            h = bn(simam(F.conv2d(h, sd[f"{p}.conv2.0.weight"], padding=1)), f"{p}.bn2")
            if f"{p}.shortcut.0.weight" in sd:
                shortcut = bn(F.conv2d(out, sd[f"{p}.shortcut.0.weight"], stride=stride), f"{p}.shortcut.1")
            else:
                shortcut = out
            out = F.relu(h + shortcut)
    return F.linear(out.mean(dim=(2, 3)), sd["linear.weight"], sd["linear.bias"])


def test_official_checkpoint_loads_strictly(official):
    assert len(official["state_dict"]) == 226
    model = build_model("resnet20", 100, e_lambda=1e-4, shortcut="B")
    meta = load_official_checkpoint(model, OFFICIAL)
    assert meta == {"epoch": 129, "arch": "resnet20", "best_acc": pytest.approx(69.83), "simam": True}
    mapped = map_official_state_dict(official["state_dict"])
    assert set(mapped) == set(model.state_dict())
    for key, value in model.state_dict().items():
        assert torch.equal(value, mapped[key]), key


@pytest.mark.parametrize("lam", [1e-4, 0.1])
def test_loaded_checkpoint_computes_the_official_network(official, lam):
    sd = {k: v.double() if v.is_floating_point() else v for k, v in official["state_dict"].items()}
    model = build_model("resnet20", 100, e_lambda=lam).double().eval()
    load_official_checkpoint(model, OFFICIAL)
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():
        ours = model(x)
    expected = official_forward(sd, x, lam)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)
    assert torch.equal(ours.argmax(1), expected.argmax(1))


def test_lambda_changes_the_logits_of_the_same_weights():
    x = torch.randn(32, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    logits = {}
    for lam in (1e-4, 0.1):
        model = build_model("resnet20", 100, e_lambda=lam).eval()
        load_official_checkpoint(model, OFFICIAL)
        with torch.no_grad():
            logits[lam] = model(x)
    assert (logits[1e-4] - logits[0.1]).abs().max() > 1e-2


def test_refuses_a_model_that_does_not_fit(tmp_path):
    with pytest.raises(ValueError, match=r"trained with SimAM, but the model was built with attention='none'"):
        load_official_checkpoint(build_model("resnet20", 100, attention="none"), OFFICIAL)
    with pytest.raises(ValueError, match=r"missing keys: layer1\.3\."):
        load_official_checkpoint(build_model("resnet32", 100), OFFICIAL)
    with pytest.raises(ValueError, match=r"shape mismatches.*fc\.weight \(100, 64\) vs \(10, 64\)"):
        load_official_checkpoint(build_model("resnet20", 10), OFFICIAL)
    with pytest.raises(ValueError, match=r"unexpected keys: layer2\.0\.downsample\.0\.weight"):
        load_official_checkpoint(build_model("resnet20", 100, shortcut="A"), OFFICIAL)


def test_refusal_leaves_the_model_unchanged():
    model = build_model("resnet20", 10)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        load_official_checkpoint(model, OFFICIAL)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bare_state_dict_and_data_parallel_prefix(official, tmp_path):
    path = tmp_path / "bare.pth"
    torch.save({f"module.{k}": v for k, v in official["state_dict"].items()}, path)
    model = build_model("resnet20", 100)
    assert load_official_checkpoint(model, path) == {"simam": True}


def test_unreadable_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found: .*nothing.pth"):
        load_official_checkpoint(build_model("resnet20", 100), tmp_path / "nothing.pth")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint" * 100)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(OFFICIAL.read_bytes()[:100_000])
    for path in (garbage, truncated):
        with pytest.raises(ValueError, match="is not a readable PyTorch checkpoint"):
            load_official_checkpoint(build_model("resnet20", 100), path)
    notdict = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], notdict)
    with pytest.raises(ValueError, match="holds no state dict"):
        load_official_checkpoint(build_model("resnet20", 100), notdict)
