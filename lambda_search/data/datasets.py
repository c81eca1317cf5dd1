"""Data sets as uint8 tensors, behind one registry.

A data set is held whole as a uint8 tensor (N, C, H, W) with int64 labels, on the device
that trains on it; augmentation and normalisation run batched there (see ``_augment``).

- ``cifar10``, ``cifar100``: the official "python version" folders (cifar-10-batches-py,
  cifar-100-python) under ``root``; ``download=True`` fetches them through torchvision.
  The pickled batches are read only from that folder: point ``root`` at your own copy.
- ``imagefolder``: an ImageNet-style tree ``root/<split>/<class>/<image>``; images are
  decoded once into a memory-mapped uint8 cache (resized, shorter side ``cache_size``,
  centre square) under ``root/.lambda_search_cache``.
- ``digits``: scikit-learn's bundled handwritten digits (1,797 real 8x8 images), offline.
- ``synthetic``: class-dependent random images of any size, for tests and benchmarks.

Test splits (``split="test"``, for the final evaluation): CIFAR's official test batch; an
image folder's ``root/val`` (ImageNet's layout; else ``root/test``). Digits have none: a
study holds part of them out (``subset``, with ``_folds.test_split``), as for synthetic data.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["Augmentation", "ImageData", "DATASETS", "load_dataset", "dataset_fingerprint",
           "subset", "join"]

_COMPUTED_STATS = ("digits", "synthetic")  # mean and std measured on the images (not constants)

DATASETS = ("cifar10", "cifar100", "imagefolder", "digits", "synthetic")
SPLITS = ("train", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm")
CACHE_DIR = ".lambda_search_cache"


@dataclass(frozen=True)
class Augmentation:
    """How a batch is prepared. ``kind="crop_flip"``: zero-pad ``pad`` pixels, random crop
    back to the image size, random horizontal flip (CIFAR). ``kind="resized_crop"``: random
    crop of ``scale`` of the area and aspect ``ratio``, resized to ``size``, flip; evaluation
    takes the centre ``size`` x ``size`` crop (ImageNet)."""

    kind: str = "crop_flip"
    pad: int = 4
    flip: bool = True
    size: int | None = None
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)


@dataclass(frozen=True, eq=False)
class ImageData:
    name: str
    images: Tensor  # uint8 (N, C, H, W)
    labels: Tensor  # int64 (N,)
    classes: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    augmentation: Augmentation = field(default_factory=Augmentation)
    # identifies the content without hashing every byte (imagefolder: its file listing)
    content_key: str | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 (N, C, H, W) tensor, got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must have shape ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def input_size(self) -> int:
        """Side of the images the network sees."""
        return self.augmentation.size or self.images.shape[-1]

    def to(self, device: str | torch.device) -> ImageData:
        return replace(self, images=self.images.to(device), labels=self.labels.to(device))


def subset(data: ImageData, index) -> ImageData:
    """The images ``index`` of ``data`` (a copy). Where mean and std are measured on the images
    (digits, synthetic) they are measured again on the subset, so that images held out for
    testing never inform the normalisation."""
    index = torch.as_tensor(np.asarray(index), dtype=torch.int64)
    images = data.images[index].contiguous()
    mean, std = _stats(images) if data.name in _COMPUTED_STATS else (data.mean, data.std)
    key = None
    if data.content_key is not None:
        key = f"{data.content_key}[{hashlib.sha256(index.numpy().tobytes()).hexdigest()[:16]}]"
    return replace(data, images=images, labels=data.labels[index].contiguous(), mean=mean, std=std, content_key=key)


def join(first: ImageData, second: ImageData, cache: Path | None = None) -> ImageData:
    """``second``'s images after ``first``'s, normalised as ``first`` (its training set). With
    ``cache`` (a folder: an image folder's cache), the joined images are a memory-mapped file
    there, written once, so that a data set larger than memory stays on disk."""
    if first.images.shape[1:] != second.images.shape[1:] or first.classes != second.classes:
        raise ValueError(f"cannot join {second.name} images {tuple(second.images.shape[1:])} of {len(second.classes)} "
                         f"classes to {tuple(first.images.shape[1:])} of {len(first.classes)}")
    key = None if first.content_key is None else f"{first.content_key}+{second.content_key}"
    if cache is None or key is None:
        images = torch.cat([first.images, second.images])
    else:
        name = f"joined-{hashlib.sha256(key.encode()).hexdigest()[:16]}.u8.npy"
        images = _joined_file(first.images, second.images, Path(cache) / name)
    return replace(first, images=images, labels=torch.cat([first.labels, second.labels]), content_key=key)


def _joined_file(a: Tensor, b: Tensor, path: Path, chunk: int = 4096) -> Tensor:
    """``a`` then ``b`` in the memory-mapped file ``path`` (written once, whole, then renamed)."""
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(a) + len(b), *a.shape[1:]))
        for offset, part in ((0, a), (len(a), b)):
            for i in range(0, len(part), chunk):
                piece = part[i : i + chunk].numpy()
                out[offset + i : offset + i + len(piece)] = piece
        out.flush()
        del out
        os.replace(tmp, path)
    return torch.from_numpy(np.load(path, mmap_mode="c"))


def dataset_fingerprint(data: ImageData) -> str:
    """SHA-256 of the images, labels and augmentation: the same data gives the same string."""
    h = hashlib.sha256()
    h.update(json.dumps([data.name, list(data.images.shape), data.classes, repr(data.augmentation)]).encode())
    if data.content_key is not None:
        h.update(data.content_key.encode())
    else:
        h.update(data.images.cpu().contiguous().numpy().tobytes())
    h.update(data.labels.cpu().numpy().astype(np.int64).tobytes())
    return h.hexdigest()


def _stats(images: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    x = images.double() / 255
    return tuple(x.mean(dim=(0, 2, 3)).tolist()), tuple(x.std(dim=(0, 2, 3)).tolist())


# ---------------------------------------------------------------- CIFAR


_CIFAR = {
    # name: (folder, train files, test files, label key, meta file, class key, mean, std)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                b"labels", "batches.meta", b"label_names",
                (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels", "meta", b"fine_label_names",
                 (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            return pickle.load(f, encoding="bytes")
    except FileNotFoundError:
        raise
    except Exception as exc:
        raise ValueError(f"{path} is not a readable CIFAR batch ({type(exc).__name__})") from None


def _load_cifar(name: str, root: str | None, split: str, download: bool) -> ImageData:
    folder, train_files, test_files, label_key, meta_file, class_key, mean, std = _CIFAR[name]
    if root is None:
        raise ValueError(f"data set {name!r} needs a root folder (the folder that holds {folder}/)")
    base = Path(root).expanduser() / folder
    if not base.is_dir() and download:
        import torchvision  # only for the opt-in download

        cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
        cls(root=str(Path(root).expanduser()), train=True, download=True)
    if not base.is_dir():
        raise FileNotFoundError(
            f"{name} not found: expected the folder {base} (the official python version); "
            f"pass download=True (--set data.download=true) to fetch it"
        )
    files = train_files if split == "train" else test_files
    images, labels = [], []
    for file in files:
        batch = _unpickle(base / file)
        if b"data" not in batch or label_key not in batch:
            raise ValueError(f"{base / file} is not a {name} batch: it lacks 'data' or '{label_key.decode()}'")
        images.append(np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
        labels.append(np.asarray(batch[label_key], dtype=np.int64))
    meta = _unpickle(base / meta_file)
    classes = tuple(c.decode() if isinstance(c, bytes) else str(c) for c in meta[class_key])
    return ImageData(name, torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels)),
                     classes, mean, std, Augmentation("crop_flip", pad=4, flip=True))


# ---------------------------------------------------------------- ImageFolder


def _scan(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    samples = []
    for label, cls in enumerate(classes):
        for path in sorted((folder / cls).rglob("*")):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                samples.append((str(path.relative_to(folder)), label))
    return classes, samples


def _decode(path: Path, size: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            w, h = img.size
            s = size / min(w, h)
            img = img.resize((max(size, round(w * s)), max(size, round(h * s))), Image.BILINEAR)
            w, h = img.size
            left, top = (w - size) // 2, (h - size) // 2
            img = img.crop((left, top, left + size, top + size))
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from None


def _load_imagefolder(root: str | None, split: str, resolution: int = 112, cache_size: int | None = None,
                      workers: int = 8) -> ImageData:
    if root is None:
        raise ValueError("data set 'imagefolder' needs a root folder holding train/<class>/<image> files")
    if not isinstance(resolution, int) or resolution < 8:
        raise ValueError(f"resolution must be an integer >= 8, got resolution={resolution!r}")
    cache_size = cache_size or round(resolution * 8 / 7)  # 112 -> 128, 224 -> 256
    if cache_size < resolution:
        raise ValueError(f"cache_size must be >= resolution={resolution}, got cache_size={cache_size}")
    folder = Path(root).expanduser() / split
    if split == "test" and (Path(root).expanduser() / "val").is_dir():
        folder = Path(root).expanduser() / "val"  # ImageNet's layout: train/ and val/
    if not folder.is_dir():
        raise FileNotFoundError(f"imagefolder not found: expected the folder {folder} with one sub-folder per class")
    classes, samples = _scan(folder)
    if not samples:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}) in class sub-folders")

    # the cache is keyed by the file list (names, sizes, times) and the stored size
    listing = hashlib.sha256()
    for rel, label in samples:
        st = (folder / rel).stat()
        listing.update(f"{rel}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    key = listing.hexdigest()
    cache = Path(root).expanduser() / CACHE_DIR / f"{split}-{cache_size}-{key[:16]}"
    images_file, labels_file = cache.with_suffix(".u8.npy"), cache.with_suffix(".labels.npy")
    if not images_file.exists():
        images_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = images_file.with_suffix(f".tmp{os.getpid()}")
        array = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(len(samples), 3, cache_size, cache_size)
        )
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for i, img in enumerate(pool.map(lambda s: _decode(folder / s[0], cache_size), samples)):
                array[i] = img
        array.flush()
        del array
        np.save(labels_file, np.array([label for _, label in samples], dtype=np.int64))
        os.replace(tmp, images_file)  # the images file appears last and whole
    # memory-mapped (copy-on-write, so the tensor is writable without copying): pages
    # load as batches touch them, never decoded again
    images = torch.from_numpy(np.load(images_file, mmap_mode="c"))
    labels = torch.from_numpy(np.load(labels_file))
    aug = Augmentation("resized_crop", pad=0, flip=True, size=resolution)
    return ImageData("imagefolder", images, labels, tuple(classes), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                     aug, content_key=f"{key}-{cache_size}")


# ---------------------------------------------------------------- digits, synthetic


def _load_digits(split: str) -> ImageData:
    from sklearn.datasets import load_digits

    if split != "train":
        raise ValueError("data set 'digits' has one split, 'train' (its 1,797 images); cross-validate within it")
    bunch = load_digits()
    gray = np.rint(bunch.images * (255 / 16)).astype(np.uint8)  # values 0..16 -> 0..255
    images = torch.from_numpy(np.repeat(gray[:, None], 3, axis=1))  # 3 channels for the ResNet stem
    mean, std = _stats(images)
    classes = tuple(str(c) for c in bunch.target_names)
    # a mirrored digit is another glyph: crop, but never flip
    return ImageData("digits", images, torch.from_numpy(bunch.target.astype(np.int64)), classes, mean, std,
                     Augmentation("crop_flip", pad=1, flip=False))


def _load_synthetic(split: str, num_samples: int = 1000, num_classes: int = 10, image_size: int = 32,
                    channels: int = 3, seed: int = 0, noise: float = 60.0) -> ImageData:
    for key, value, low in (("num_samples", num_samples, 1), ("num_classes", num_classes, 2),
                            ("image_size", image_size, 2), ("channels", channels, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{key} must be an integer >= {low}, got {key}={value!r}")
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.rand(num_classes, channels, image_size, image_size, generator=g) * 255
    # the test split draws other samples of the same classes
    g.manual_seed(seed * 2 + (1 if split == "test" else 0) + 1)
    labels = torch.arange(num_samples) % num_classes
    labels = labels[torch.randperm(num_samples, generator=g)]
    noisy = prototypes[labels] + torch.randn(num_samples, channels, image_size, image_size, generator=g) * noise
    images = noisy.clamp(0, 255).round().to(torch.uint8)
    mean, std = _stats(images)
    return ImageData("synthetic", images, labels, tuple(str(c) for c in range(num_classes)), mean, std,
                     Augmentation("crop_flip", pad=max(1, image_size // 8), flip=True))


def load_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train",
                 download: bool = False, **options) -> ImageData:
    """Load a data set by name (see the module docstring), on the CPU."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set name={name!r}; valid names: {', '.join(DATASETS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got split={split!r}")
    root = os.fspath(root) if root is not None else None
    allowed = {"imagefolder": {"resolution", "cache_size", "workers"},
               "synthetic": {"num_samples", "num_classes", "image_size", "channels", "seed", "noise"}}.get(name, set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        valid = ", ".join(sorted(allowed)) or "none"
        raise ValueError(f"unknown option(s) {', '.join(unknown)} for data set {name!r}; valid options: {valid}")
    if name in _CIFAR:
        return _load_cifar(name, root, split, download)
    if name == "imagefolder":
        return _load_imagefolder(root, split, **options)
    if name == "digits":
        return _load_digits(split)
    return _load_synthetic(split, **options)
