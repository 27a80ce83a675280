"""Offline datasets (CIFAR-10, MNIST, scikit-learn digits) and a fast batched loader with tensor augmentation.

Nothing here downloads. CIFAR-10 and MNIST are read from the project's shared data folder (``cifar10_jpeg.npz``,
``mnist.npz``; see ``../shared/data/README.md``) or from a torchvision folder (``cifar-10-batches-py``,
``MNIST/raw``). The CIFAR-10 JPEGs are decoded once with Pillow and the uint8 arrays cached under
``~/.cache/fxqat/`` (``$FXQAT_CACHE`` overrides), never in the repository.

Search order for a dataset: the explicit ``root`` (only that one, so a wrong ``--data-dir`` is an error rather than
a silent fallback), else ``$FXQAT_DATA``, else ``../shared/data`` relative to the repository and to the current
directory. Missing data raises a :class:`FileNotFoundError` that lists every place searched and how to fix it.

Datasets hold uint8 images ``(N, C, H, W)``; :class:`BatchLoader` gathers a batch, applies the usual augmentation
(random crop with 4-pixel zero padding + horizontal flip for CIFAR) on the whole batch at once, converts to float and
normalises. Its order and its augmentation depend only on ``(seed, epoch, batch index)``, so a run resumed in the
middle of an epoch sees exactly the batches it would have seen.

Example:
    >>> from fxqat import data
    >>> ds = data.digits(train=False)
    >>> x, y = next(iter(data.BatchLoader(ds, batch_size=8, train=False)))
    >>> tuple(x.shape), x.dtype, y.dtype
    ((8, 1, 8, 8), torch.float32, torch.int64)
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler

__all__ = [
    "ImageDataset",
    "BatchLoader",
    "cifar10",
    "mnist",
    "digits",
    "load",
    "data_available",
    "search_paths",
    "cache_dir",
    "DATASETS",
]

log = logging.getLogger(__name__)
PathLike = Union[str, os.PathLike]
_REPO = Path(__file__).resolve().parent.parent
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


@dataclass
class ImageDataset(Dataset):
    """Images as one uint8 tensor plus labels and the normalisation/augmentation that suits them.

    Attributes:
        images: uint8 ``(N, C, H, W)``.
        labels: int64 ``(N,)``.
        mean, std: per-channel normalisation on the [0, 1] scale.
        name: dataset name; ``num_classes``: number of classes; ``augment``: ``"crop_flip"`` or ``"none"``.
        source: where the data came from (for logs and result tables).
    """

    images: torch.Tensor
    labels: torch.Tensor
    mean: Tuple[float, ...]
    std: Tuple[float, ...]
    name: str
    num_classes: int
    augment: str = "none"
    source: str = ""

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> Tuple[torch.Tensor, torch.Tensor]:
        return normalize(self.images[i : i + 1], self.mean, self.std)[0], self.labels[i]

    @property
    def input_shape(self) -> Tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    def subset(self, n: int) -> "ImageDataset":
        """The first ``n`` examples (a view; for quick runs and tests)."""
        return ImageDataset(self.images[:n], self.labels[:n], self.mean, self.std, self.name, self.num_classes,
                            self.augment, self.source)


def normalize(x_u8: torch.Tensor, mean: Tuple[float, ...], std: Tuple[float, ...]) -> torch.Tensor:
    """uint8 ``(B, C, H, W)`` -> normalised float32."""
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
    return (x_u8.float() - m) / s


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop after ``pad`` pixels of zero padding, then random horizontal flip, for a whole batch at once."""
    b, _, h, w = x.shape
    xp = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (b, 1), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (b, 1), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    cols = torch.arange(w).expand(b, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + ox
    rows = oy + torch.arange(h)
    bi = torch.arange(b)[:, None, None]
    out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2).contiguous()


class BatchLoader:
    """Shuffled, batched, augmented iteration over an :class:`ImageDataset`, shardable like ``DistributedSampler``.

    Args:
        ds: the dataset.
        batch_size: examples per batch (per process under DDP).
        train: shuffle and augment (as ``ds.augment`` says); otherwise fixed order, no augmentation.
        seed: base seed; epoch ``e`` uses ``seed + e`` for the order, batch ``i`` its own augmentation generator.
        rank, world_size: shard of this process (the default reads torch.distributed when initialised).
        drop_last: drop the last incomplete batch (default: ``train``).
    """

    def __init__(self, ds: ImageDataset, batch_size: int = 128, train: bool = True, seed: int = 0,
                 rank: Optional[int] = None, world_size: Optional[int] = None, drop_last: Optional[bool] = None):
        if rank is None or world_size is None:
            dist = torch.distributed.is_available() and torch.distributed.is_initialized()
            rank = torch.distributed.get_rank() if dist else 0
            world_size = torch.distributed.get_world_size() if dist else 1
        self.ds, self.batch_size, self.train, self.seed = ds, int(batch_size), train, int(seed)
        self.drop_last = train if drop_last is None else drop_last
        self.sampler = DistributedSampler(ds, num_replicas=world_size, rank=rank, shuffle=train, seed=seed,
                                          drop_last=False)
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch (order and augmentation) and the batch to start from (for a mid-epoch resume)."""
        self.epoch, self.start_batch = int(epoch), int(start_batch)
        self.sampler.set_epoch(self.epoch)

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        idx = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        for i in range(self.start_batch, len(self)):
            j = idx[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.ds.images[j]
            if self.train and self.ds.augment == "crop_flip":
                gen = torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + i) % 2**62)
                x = crop_flip(x, gen)
            yield normalize(x, self.ds.mean, self.ds.std), self.ds.labels[j]


# ----------------------------------------------------------------------------------------------- locations
def cache_dir() -> Path:
    """``$FXQAT_CACHE`` or ``~/.cache/fxqat``."""
    return Path(os.environ.get("FXQAT_CACHE") or Path.home() / ".cache" / "fxqat")


def search_paths(root: Optional[PathLike] = None) -> List[Path]:
    """The folders searched for data, in order (only ``root`` when it is given)."""
    if root is not None:
        return [Path(root).expanduser()]
    out = [Path(os.environ["FXQAT_DATA"]).expanduser()] if os.environ.get("FXQAT_DATA") else []
    out += [_REPO.parent / "shared" / "data", Path.cwd().parent / "shared" / "data", Path.cwd() / "shared" / "data"]
    seen: List[Path] = []
    for p in out:
        if p.resolve() not in [s.resolve() for s in seen]:
            seen.append(p)
    return seen


def _missing(name: str, places: List[str]) -> FileNotFoundError:
    listed = "\n  ".join(places)
    return FileNotFoundError(
        f"fxqat.data: dataset {name!r} not found. Searched:\n  {listed}\n"
        f"Fix: pass --data-dir/root= a folder holding the shared npz file or torchvision's extracted files, or set "
        f"FXQAT_DATA=/path/to/shared/data (see ../shared/data/README.md). Nothing is downloaded."
    )


def _locate(name: str, npz: str, tv_dir: str, root: Optional[PathLike]) -> Tuple[str, Path]:
    """``("npz", file)`` or ``("torchvision", root)`` for the first place holding the data."""
    tried: List[str] = []
    for base in search_paths(root):
        if base.is_file() and base.name == npz:
            return "npz", base
        for cand in (base / npz,):
            tried.append(str(cand))
            if cand.is_file():
                return "npz", cand
        for tv_root in (base, base.parent):
            tried.append(str(tv_root / tv_dir))
            if (tv_root / tv_dir).is_dir():
                return "torchvision", tv_root
    raise _missing(name, tried)


def _fingerprint(path: Path) -> str:
    st = path.stat()
    return hashlib.sha1(f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def _atomic_save_npz(path: Path, **arrays: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _decode_jpegs(buf: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    from PIL import Image

    n = len(offsets) - 1
    out = np.empty((n, 32, 32, 3), dtype=np.uint8)
    for i in range(n):
        out[i] = np.asarray(Image.open(io.BytesIO(buf[offsets[i] : offsets[i + 1]].tobytes())).convert("RGB"))
    return out


def _torchvision(cls, root: Path, train: bool, folder: str):
    """A torchvision dataset from ``root`` without download; its "not found or corrupted" becomes our error."""
    try:
        return cls(str(root), train=train, download=False)
    except RuntimeError as e:
        raise FileNotFoundError(
            f"fxqat.data: found {root / folder} but torchvision could not read it ({e}). Re-extract the original "
            f"archive there, or use the shared npz files (FXQAT_DATA=/path/to/shared/data)."
        ) from e


# ----------------------------------------------------------------------------------------------- datasets
def cifar10(root: Optional[PathLike] = None, train: bool = True) -> ImageDataset:
    """CIFAR-10 (JPEG version from the shared npz, decoded once and cached; or a torchvision folder).

    Returns uint8 images ``(N, 3, 32, 32)`` with CIFAR normalisation and crop+flip augmentation for training.
    """
    kind, where = _locate("cifar10", "cifar10_jpeg.npz", "cifar-10-batches-py", root)
    split = "train" if train else "test"
    if kind == "torchvision":
        import torchvision

        tv = _torchvision(torchvision.datasets.CIFAR10, where, train, "cifar-10-batches-py")
        x, y, source = np.asarray(tv.data), np.asarray(tv.targets, dtype=np.int64), f"torchvision:{where}"
    else:
        cached = cache_dir() / f"cifar10_{split}_{_fingerprint(where)}.npz"
        source = f"{where} (JPEG CIFAR-10)"
        x = y = None
        if cached.is_file():
            try:
                with np.load(cached) as c:
                    x, y = c["x"], c["y"]
            except Exception as e:  # a damaged cache is rebuilt, not fatal
                log.warning("fxqat.data: ignoring unreadable cache %s (%s); decoding again", cached, e)
        if x is None:
            log.info("fxqat.data: decoding CIFAR-10 %s JPEGs from %s (once; cached in %s)", split, where, cached)
            with np.load(where) as d:
                x = _decode_jpegs(d[f"{split}_jpeg"], d[f"{split}_offsets"])
                y = d[f"y_{split}"].astype(np.int64)
            _atomic_save_npz(cached, x=x, y=y)
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(images, torch.from_numpy(np.asarray(y, dtype=np.int64)), CIFAR_MEAN, CIFAR_STD, "cifar10",
                        10, "crop_flip" if train else "none", source)


def mnist(root: Optional[PathLike] = None, train: bool = True) -> ImageDataset:
    """MNIST from the shared ``mnist.npz`` (lossless) or a torchvision ``MNIST/raw`` folder; uint8 ``(N, 1, 28, 28)``."""
    kind, where = _locate("mnist", "mnist.npz", "MNIST", root)
    split = "train" if train else "test"
    if kind == "torchvision":
        import torchvision

        tv = _torchvision(torchvision.datasets.MNIST, where, train, "MNIST")
        x, y, source = tv.data.numpy(), tv.targets.numpy().astype(np.int64), f"torchvision:{where}"
    else:
        with np.load(where) as d:
            x, y, source = d[f"x_{split}"], d[f"y_{split}"].astype(np.int64), str(where)
    images = torch.from_numpy(np.ascontiguousarray(x)).unsqueeze(1)
    return ImageDataset(images, torch.from_numpy(y), MNIST_MEAN, MNIST_STD, "mnist", 10, "none", source)


def digits(root: Optional[PathLike] = None, train: bool = True, test_fraction: float = 0.2) -> ImageDataset:
    """scikit-learn's 8x8 digits (bundled with scikit-learn, offline); a fixed seeded train/test split.

    Pixel values 0..16 are scaled to uint8 0..255; ``root`` is accepted for symmetry and ignored.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - scikit-learn is a dev dependency
        raise FileNotFoundError("fxqat.data: 'digits' needs scikit-learn: pip install scikit-learn") from e
    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    perm = np.random.RandomState(0).permutation(len(x))
    n_test = int(round(len(x) * test_fraction))
    sel = perm[n_test:] if train else perm[:n_test]
    xt = torch.from_numpy(x[sel])
    mean = float(x[perm[n_test:]].mean()) / 255.0
    std = float(x[perm[n_test:]].std()) / 255.0
    return ImageDataset(xt, torch.from_numpy(d.target[sel].astype(np.int64)), (mean,), (std,), "digits", 10, "none",
                        "sklearn.datasets.load_digits")


DATASETS: Dict[str, Callable[..., ImageDataset]] = {"cifar10": cifar10, "mnist": mnist, "digits": digits}


def load(name: str, root: Optional[PathLike] = None, train: bool = True) -> ImageDataset:
    """The dataset called ``name`` (one of :data:`DATASETS`); ``ValueError`` listing the known names otherwise."""
    if name not in DATASETS:
        raise ValueError(f"fxqat.data: unknown dataset {name!r}; known datasets: {sorted(DATASETS)}.")
    return DATASETS[name](root=root, train=train)


def data_available(name: str, root: Optional[PathLike] = None) -> bool:
    """Whether ``name`` can be loaded without a download (for ``pytest.skip`` and CLI fallbacks)."""
    if name == "digits":
        try:
            import sklearn  # noqa: F401
        except ImportError:
            return False
        return True
    files = {"cifar10": ("cifar10_jpeg.npz", "cifar-10-batches-py"), "mnist": ("mnist.npz", "MNIST")}
    if name not in files:
        return False
    try:
        _locate(name, *files[name], root)
        return True
    except FileNotFoundError:
        return False
