"""Data sets: each loader on a miniature copy in its real on-disk format, and its errors."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import lambda_search as ls
from lambda_search.data import augment as _augment
from lambda_search.data import datasets as _data


def write_cifar10(root, per_batch=6):
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(x) for x in rng.integers(0, 10, size=per_batch)]
        batches[name] = (data, labels)
        with open(base / name, "wb") as f:  # as the official files: bytes keys, protocol 2
            pickle.dump({b"batch_label": name.encode(), b"labels": labels, b"data": data,
                         b"filenames": [b"x.png"] * per_batch}, f, protocol=2)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}, f, protocol=2)
    return batches


def write_cifar100(root, n=20):
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    out = {}
    for name in ("train", "test"):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        fine = [int(x) for x in rng.integers(0, 100, size=n)]
        out[name] = (data, fine)
        with open(base / name, "wb") as f:
            pickle.dump({b"data": data, b"fine_labels": fine, b"coarse_labels": [0] * n}, f, protocol=2)
    with open(base / "meta", "wb") as f:
        pickle.dump({b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                     b"coarse_label_names": [b"x"] * 20}, f, protocol=2)
    return out


def test_cifar10_reads_the_official_layout(tmp_path):
    batches = write_cifar10(tmp_path)
    data = ls.load_dataset("cifar10", root=tmp_path)
    assert data.images.shape == (30, 3, 32, 32) and data.images.dtype == torch.uint8
    assert data.classes == tuple(f"class{i}" for i in range(10))
    raw, labels = batches["data_batch_2"]
    # a row is 1024 red, then 1024 green, then 1024 blue values, row-major
    assert data.images[6, 1, 2, 5] == raw[0, 1024 + 2 * 32 + 5]
    assert data.labels[6:12].tolist() == labels
    test = ls.load_dataset("cifar10", root=tmp_path, split="test")
    assert len(test) == 6 and test.labels.tolist() == batches["test_batch"][1]
    assert data.augmentation == _data.Augmentation("crop_flip", pad=4, flip=True)


def test_cifar100_reads_fine_labels(tmp_path):
    out = write_cifar100(tmp_path)
    data = ls.load_dataset("cifar100", root=tmp_path)
    assert data.num_classes == 100 and len(data) == 20
    assert data.labels.tolist() == out["train"][1]
    assert torch.equal(data.images.reshape(20, -1), torch.from_numpy(out["train"][0]))


def test_missing_cifar_names_the_path_and_the_download_option(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected the folder .*cifar-100-python.*download=True"):
        ls.load_dataset("cifar100", root=tmp_path)
    with pytest.raises(ValueError, match="needs a root folder"):
        ls.load_dataset("cifar10")


def test_corrupt_cifar_batch(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"\x80\x02garbage")
    with pytest.raises(ValueError, match="data_batch_3 is not a readable CIFAR batch"):
        ls.load_dataset("cifar10", root=tmp_path)


def test_download_goes_through_torchvision(tmp_path, monkeypatch):
    import torchvision

    calls = []

    def fake_cifar10(root, train, download):
        calls.append((root, train, download))
        write_cifar10(tmp_path)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    data = ls.load_dataset("cifar10", root=tmp_path, download=True)
    assert calls == [(str(tmp_path), True, True)] and len(data) == 30
    ls.load_dataset("cifar10", root=tmp_path, download=True)  # present: no second download
    assert len(calls) == 1


def write_tree(root, sizes=((40, 30), (30, 50), (64, 64), (20, 24))):
    rng = np.random.default_rng(2)
    for c, cls in enumerate(("cat", "dog", "emu")):
        (root / "train" / cls).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            pixels = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "train" / cls / f"{i}.jpg", quality=95)


def test_imagefolder_decodes_once_into_a_memory_mapped_cache(tmp_path, monkeypatch):
    write_tree(tmp_path)
    data = ls.load_dataset("imagefolder", root=tmp_path, resolution=16)
    assert data.images.shape == (12, 3, 18, 18)  # stored at 16 * 8/7, evaluated at 16
    assert data.classes == ("cat", "dog", "emu") and data.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert data.input_size == 16
    cached = list((tmp_path / ".lambda_search_cache").glob("*.u8.npy"))
    assert len(cached) == 1

    def no_decoding(*args):
        raise AssertionError("decoded again")

    monkeypatch.setattr(_data, "_decode", no_decoding)
    again = ls.load_dataset("imagefolder", root=tmp_path, resolution=16)
    assert torch.equal(again.images, data.images)
    assert _data.dataset_fingerprint(again) == _data.dataset_fingerprint(data)
    # eval: resize (done in the cache) then centre crop; train: random resized crops
    g = torch.Generator().manual_seed(0)
    idx = torch.arange(12)
    assert _augment.eval_batch(data, idx, torch.device("cpu")).shape == (12, 3, 16, 16)
    assert _augment.train_batch(data, idx, g, torch.device("cpu")).shape == (12, 3, 16, 16)


def test_imagefolder_resize_keeps_the_centre(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)
    pixels[:, 10:30] = 255  # the central square is white, the sides black
    Image.fromarray(pixels).save(tmp_path / "train" / "a" / "x.png")
    data = ls.load_dataset("imagefolder", root=tmp_path, resolution=8, cache_size=10)
    assert data.images.shape == (1, 3, 10, 10)
    assert data.images[..., 1:-1].min() == 255  # the centre square, resized
    assert data.images.min() > 128  # the black sides are cut (only filter blur at the edge)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected the folder .*train with one sub-folder per class"):
        ls.load_dataset("imagefolder", root=tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="holds no images"):
        ls.load_dataset("imagefolder", root=tmp_path)
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match="cannot decode image .*broken.jpg"):
        ls.load_dataset("imagefolder", root=tmp_path)
    with pytest.raises(ValueError, match="resolution must be an integer >= 8, got resolution=4"):
        ls.load_dataset("imagefolder", root=tmp_path, resolution=4)


def test_digits_are_the_bundled_real_images():
    data = ls.load_dataset("digits")
    assert data.images.shape == (1797, 3, 8, 8) and data.num_classes == 10
    assert data.images.max() == 255 and data.images.min() == 0
    assert torch.equal(data.images[:, 0], data.images[:, 2])
    assert data.augmentation.flip is False  # a mirrored digit is another glyph
    with pytest.raises(ValueError, match="one split, 'train'"):
        ls.load_dataset("digits", split="test")


def test_synthetic_is_seeded_and_class_dependent():
    a = ls.load_dataset("synthetic", num_samples=200, num_classes=4, image_size=8, seed=3)
    b = ls.load_dataset("synthetic", num_samples=200, num_classes=4, image_size=8, seed=3)
    c = ls.load_dataset("synthetic", num_samples=200, num_classes=4, image_size=8, seed=4)
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    # nearest class mean separates the classes well above chance
    x = a.images.float().flatten(1)
    means = torch.stack([x[a.labels == k].mean(0) for k in range(4)])
    assert (torch.cdist(x, means).argmin(1) == a.labels).float().mean() > 0.9
    test = ls.load_dataset("synthetic", split="test", num_samples=200, num_classes=4, image_size=8, seed=3)
    assert not torch.equal(test.images, a.images)


def test_registry_errors():
    with pytest.raises(
        ValueError,
        match="unknown data set name='mnist'; valid names: cifar10, cifar100, imagefolder, digits, synthetic",
    ):
        ls.load_dataset("mnist")
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got split='val'"):
        ls.load_dataset("digits", split="val")
    with pytest.raises(ValueError, match="unknown option.*colour.*valid options"):
        ls.load_dataset("synthetic", colour=True)
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2, got num_classes=1"):
        ls.load_dataset("synthetic", num_classes=1)


def test_fingerprint_sees_one_pixel():
    data = ls.load_dataset("synthetic", num_samples=50, image_size=8)
    before = _data.dataset_fingerprint(data)
    assert _data.dataset_fingerprint(data) == before
    data.images[7, 1, 2, 3] ^= 1
    assert _data.dataset_fingerprint(data) != before
