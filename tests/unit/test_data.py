"""fxqat.data: offline loaders (shapes, dtypes, labels against the npz, caching, errors) and batched augmentation."""

from pathlib import Path

import numpy as np
import pytest
import torch

from fxqat import data

SHARED = data.search_paths()
needs_cifar = pytest.mark.skipif(not data.data_available("cifar10"),
                                 reason=f"CIFAR-10 npz not found in {[str(p) for p in SHARED]} (see data README)")
needs_mnist = pytest.mark.skipif(not data.data_available("mnist"),
                                 reason=f"mnist.npz not found in {[str(p) for p in SHARED]} (see data README)")


def _npz(name):
    for p in data.search_paths():
        if (p / name).is_file():
            return p / name
    raise AssertionError(name)


@needs_cifar
def test_cifar10_test_split_matches_npz_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQAT_CACHE", str(tmp_path))
    ds = data.cifar10(train=False)
    assert ds.images.shape == (10000, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.num_classes == 10 and ds.augment == "none"
    with np.load(_npz("cifar10_jpeg.npz")) as d:
        assert np.array_equal(ds.labels.numpy(), d["y_test"])
        first = data._decode_jpegs(d["test_jpeg"], d["test_offsets"][:2])[0]
    assert np.array_equal(ds.images[0].permute(1, 2, 0).numpy(), first)
    cached = list(tmp_path.glob("cifar10_test_*.npz"))
    assert len(cached) == 1 and not list(tmp_path.glob(".*tmp"))
    again = data.cifar10(train=False)  # from the cache: identical arrays
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)
    # a damaged cache is rebuilt, not fatal
    cached[0].write_bytes(b"garbage")
    assert torch.equal(data.cifar10(train=False).images, ds.images)


@needs_cifar
def test_cifar10_train_statistics():
    ds = data.cifar10(train=True)
    assert len(ds) == 50000 and ds.augment == "crop_flip"
    counts = torch.bincount(ds.labels, minlength=10)
    assert counts.tolist() == [5000] * 10
    mean = ds.images.float().div(255).mean((0, 2, 3))
    # README: train mean (0.4913, 0.4821, 0.4465) of the JPEG data
    torch.testing.assert_close(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=6e-4, rtol=0)


@needs_mnist
def test_mnist_matches_npz():
    ds = data.mnist(train=True)
    assert ds.images.shape == (60000, 1, 28, 28) and ds.images.dtype == torch.uint8
    with np.load(_npz("mnist.npz")) as d:
        assert np.array_equal(ds.labels.numpy(), d["y_train"])
        assert np.array_equal(ds.images[:, 0].numpy(), d["x_train"])
    assert len(data.mnist(train=False)) == 10000


def test_digits_split_is_fixed_and_disjoint():
    tr, te = data.digits(train=True), data.digits(train=False)
    assert len(tr) + len(te) == 1797 and len(te) == 359
    assert tr.images.shape[1:] == (1, 8, 8) and int(tr.images.max()) == 255
    assert torch.equal(data.digits(train=False).labels, te.labels)


def test_missing_data_error_lists_places(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        data.cifar10(root=tmp_path / "nowhere")
    msg = str(e.value)
    assert str(tmp_path / "nowhere" / "cifar10_jpeg.npz") in msg and "FXQAT_DATA" in msg
    assert not data.data_available("mnist", root=tmp_path)
    assert not data.data_available("imagenet")
    with pytest.raises(ValueError, match="known datasets"):
        data.load("imagenet")


def test_env_var_is_searched_first(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQAT_DATA", str(tmp_path))
    assert data.search_paths()[0] == tmp_path
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((3, 28, 28), np.uint8), y_train=np.arange(3),
             x_test=np.zeros((1, 28, 28), np.uint8), y_test=np.arange(1))
    assert data.mnist(train=True).labels.tolist() == [0, 1, 2]


def _tiny(n=10, c=3, hw=32):
    imgs = torch.arange(n * c * hw * hw, dtype=torch.int64).remainder(251).to(torch.uint8).view(n, c, hw, hw)
    return data.ImageDataset(imgs, torch.arange(n), (0.5,) * c, (0.25,) * c, "tiny", 10, "crop_flip")


def test_crop_flip_is_a_translated_flipped_window():
    x = _tiny(64).images
    out = data.crop_flip(x, torch.Generator().manual_seed(0))
    xp = torch.nn.functional.pad(x, (4, 4, 4, 4))
    for b in range(64):  # each output equals some window of the padded input, possibly flipped
        windows = [xp[b, :, i:i + 32, j:j + 32] for i in range(9) for j in range(9)]
        hits = [w for w in windows if torch.equal(out[b], w) or torch.equal(out[b], w.flip(-1))]
        assert hits, b


def test_loader_is_deterministic_shards_and_resumes_mid_epoch():
    ds = _tiny(10)
    a = data.BatchLoader(ds, 4, train=True, seed=3, rank=0, world_size=1)
    a.set_epoch(2)
    full = list(a)
    assert len(full) == 2 and full[0][0].shape == (4, 3, 32, 32)  # drop_last in training
    a.set_epoch(2, start_batch=1)
    resumed = list(a)
    assert torch.equal(resumed[0][0], full[1][0]) and torch.equal(resumed[0][1], full[1][1])
    r0 = data.BatchLoader(ds, 5, train=True, seed=3, rank=0, world_size=2)
    r1 = data.BatchLoader(ds, 5, train=True, seed=3, rank=1, world_size=2)
    y = torch.cat([next(iter(r0))[1], next(iter(r1))[1]])
    assert sorted(y.tolist()) == list(range(10))  # the two shards cover the epoch exactly once
    ev = list(data.BatchLoader(ds, 4, train=False, rank=0, world_size=1))
    assert [len(b[1]) for b in ev] == [4, 4, 2]
    torch.testing.assert_close(ev[0][0], (ds.images[:4].float() / 255 - 0.5) / 0.25, atol=1e-6, rtol=0)


class _FakeTVCifar:
    """Stands in for torchvision.datasets.CIFAR10 (the real one checks the md5 of the original archive)."""

    def __init__(self, root, train, download):
        assert download is False and Path(root, "cifar-10-batches-py").is_dir()
        n = 6 if train else 4
        self.data = np.arange(n * 32 * 32 * 3, dtype=np.int64).reshape(n, 32, 32, 3).astype(np.uint8)
        self.targets = list(range(n))


def test_torchvision_cifar_folder(tmp_path, monkeypatch):
    import torchvision

    (tmp_path / "cifar-10-batches-py").mkdir()
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", _FakeTVCifar)
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):  # the parent folder or the batches folder itself
        ds = data.cifar10(root=root, train=True)
        assert ds.images.shape == (6, 3, 32, 32) and ds.labels.tolist() == list(range(6))
        assert torch.equal(ds.images[1].permute(1, 2, 0), torch.from_numpy(_FakeTVCifar(tmp_path, True, False).data[1]))
        assert ds.source.startswith("torchvision:") and ds.augment == "crop_flip"
    assert len(data.cifar10(root=tmp_path, train=False)) == 4


def test_unreadable_torchvision_folder_is_a_clear_error(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()  # empty: torchvision reports it corrupted
    with pytest.raises(FileNotFoundError, match="torchvision could not read it"):
        data.cifar10(root=tmp_path)
