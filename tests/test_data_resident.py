"""Device-resident views: the FFCV loader's order and shards, exact resume, RandomResizedCrop's distribution, crops
against the decoder's resize, reading raw and JPEG .beton files, the trainer on both paths, and the errors."""

import json
import math
import sys

import cv2
import numpy as np
import pytest
import torch

pytest.importorskip("ffcv", reason="the data pipeline needs fastpred[data]")

from fastpred.data import DataError, TwoViewLoader  # noqa: E402
from fastpred.data.resident import (  # noqa: E402
    MixedSizes,
    ResidentViews,
    choose_path,
    crop_params,
    read_set,
    resized_crops,
)
from fastpred.data.sources import ArraySource  # noqa: E402
from fastpred.data.write import write_beton  # noqa: E402

N = 203  # odd: two ranks need a padded shard, and batches of 16 leave a remainder to drop


def smooth_images(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    """(n, h, w, 3) uint8 gradients with a random offset per image: smooth, so resize filters nearly agree."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 200 / w, yy * 200 / h, (xx + yy) * 100 / (h + w)], -1)
    return (base[None] + rng.uniform(0, 55, (n, 1, 1, 3))).astype(np.uint8)


@pytest.fixture(scope="module")
def tagged(tmp_path_factory):
    """A raw .beton whose label is the image's index, so a batch's labels spell its positions."""
    path = tmp_path_factory.mktemp("resident") / "tagged.beton"
    images = smooth_images(N, 12, 10)
    write_beton(ArraySource(images, np.arange(N), "tagged"), path, compress_probability=0.0, workers=1)
    return path, images


@pytest.mark.parametrize("world_size", [1, 2])
def test_order_and_shards_are_the_loaders(tagged, world_size):
    path, _ = tagged
    keep = np.arange(N)[np.arange(N) % 10 != 0]  # a held-out split, as the trainer makes without --val
    for rank in range(world_size):
        common = dict(seed=5, rank=rank, world_size=world_size, indices=keep)
        resident = ResidentViews.from_beton(path, 16, 8, **common)
        loader = TwoViewLoader(path, 16, 8, num_workers=1, **common)
        assert len(resident) == len(loader) == (-(-len(keep) // world_size)) // 16
        for epoch in (0, 1):
            resident.set_epoch(epoch)
            loader.set_epoch(epoch)
            ours = [y.clone() for _, _, y in resident]
            theirs = [y.clone() for _, _, y in loader]
            assert len(ours) == len(resident)
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True)), (rank, epoch)
            assert set(torch.cat(ours).tolist()) <= set(keep.tolist())
        assert not torch.equal(ours[0], next(iter(resident))[2])  # a new epoch, a new permutation


def test_resume_mid_epoch_reads_the_same_tail(tagged):
    path, _ = tagged
    views = ResidentViews.from_beton(path, 16, 8, seed=1, rank=1, world_size=2, return_params=True)
    views.set_epoch(3)
    whole = [tuple(t.clone() for t in batch) for batch in views]
    resumed = ResidentViews.from_beton(path, 16, 8, seed=1, rank=1, world_size=2, return_params=True)
    resumed.set_epoch(3, skip_batches=2)
    tail = [tuple(t.clone() for t in batch) for batch in resumed]
    assert len(tail) == len(whole) - 2
    for a, b in zip(whole[2:], tail, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    with pytest.raises(DataError, match="cannot skip"):
        resumed.set_epoch(0, skip_batches=len(resumed))


def test_crop_distribution_is_random_resized_crops():
    from torchvision.transforms import RandomResizedCrop

    height, width, n, scale, ratio = 40, 56, 40_000, (0.08, 1.0), (3 / 4, 4 / 3)
    g = torch.Generator().manual_seed(0)
    top, left, h, w, flip = crop_params(n, height, width, scale=scale, ratio=ratio, flip_prob=0.5, generator=g,
                                        device=torch.device("cpu")).unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= height).all() and (left + w <= width).all()
    assert (h >= 1).all() and (w >= 1).all() and (top == top.round()).all() and (left == left.round()).all()
    area, log_ratio = h * w / (height * width), torch.log(w / h)
    # Sides are rounded to whole pixels, so the bounds hold up to half a pixel on each side.
    assert area.min() > scale[0] * 0.8 and area.max() <= 1
    assert log_ratio.abs().max() < math.log(4 / 3) + 0.15
    # torchvision's own sampler on the same image size: the same distribution, to sampling noise.
    torch.manual_seed(0)
    ref = torch.tensor([RandomResizedCrop.get_params(torch.empty(1, height, width), list(scale), list(ratio))
                        for _ in range(4000)], dtype=torch.float32)  # (i, j, h, w)
    ref_area, ref_log_ratio = ref[:, 2] * ref[:, 3] / (height * width), torch.log(ref[:, 3] / ref[:, 2])
    for ours, theirs in ((area, ref_area), (log_ratio, ref_log_ratio), (top / height, ref[:, 0] / height),
                         (left / width, ref[:, 1] / width)):
        for q in (0.1, 0.5, 0.9):
            assert abs(ours.quantile(q) - theirs.quantile(q)) < 0.03, q
    # Corners cover every position, both edges included.
    assert (top == 0).any() and (top + h == height).any() and (left == 0).any() and (left + w == width).any()
    assert abs(flip.mean().item() - 0.5) < 0.015


def test_fallback_crop_after_ten_misses():
    """No crop of 99-100% of a 10x100 image has a ratio within 3/4..4/3: the centred 10x13 crop, as torchvision."""
    g = torch.Generator().manual_seed(0)
    params = crop_params(500, 10, 100, scale=(0.99, 1.0), ratio=(3 / 4, 4 / 3), flip_prob=0.0, generator=g,
                         device=torch.device("cpu"))
    assert (params == torch.tensor([0.0, 43, 10, 13, 0])).all()


def test_full_image_crop_reproduces_the_image():
    images = torch.from_numpy(smooth_images(6, 12, 10, seed=3)).permute(0, 3, 1, 2)
    full = torch.tensor([[0.0, 0, 12, 10, 0]] * 6 + [[0.0, 0, 12, 10, 1]] * 6)  # view 1 as is, view 2 flipped
    out = resized_crops(images, full, (12, 10))  # (6, 3, 24, 10)
    assert out.dtype == torch.uint8
    assert torch.equal(out[:, :, :12], images) and torch.equal(out[:, :, 12:], images.flip(-1))


@pytest.mark.parametrize("side, size", [(28, 28), (32, 16)])  # crops enlarged (bilinear), shrunk (supersampled)
def test_crops_match_the_decoders_resize(side, size):
    images = smooth_images(64, side, side, seed=1)
    g = torch.Generator().manual_seed(2)
    params = crop_params(64, side, side, scale=(0.3, 1.0), ratio=(3 / 4, 4 / 3), flip_prob=0.0, generator=g,
                         device=torch.device("cpu"))
    from test_data_loader import area_resize  # the FFCV decoder's resize, spelled out with OpenCV

    ours = resized_crops(torch.from_numpy(images).permute(0, 3, 1, 2), params, (size, size))
    ref = np.stack([area_resize(img[int(t):int(t + h), int(left):int(left + w)], size)
                    for img, (t, left, h, w, _) in zip(images, params.tolist(), strict=True)])
    diff = (ours.permute(0, 2, 3, 1).float() - torch.from_numpy(ref).float()).abs()
    assert diff.mean() < 1.0 and diff.max() <= 8


def test_read_set_raw_and_jpeg(tmp_path):
    images = smooth_images(9, 20, 24, seed=4)
    labels = np.arange(9) % 3
    raw, jpg = tmp_path / "raw.beton", tmp_path / "jpg.beton"
    write_beton(ArraySource(images, labels, "raw"), raw, compress_probability=0.0, workers=1)
    write_beton(ArraySource(images, labels, "jpg"), jpg, compress_probability=1.0, jpeg_quality=95, workers=1)
    x, y = read_set(raw, np.array([7, 2, 5]), chunk_bytes=2 * 3 * 20 * 24)  # two images per chunk
    assert x.shape == (3, 3, 20, 24) and x.dtype == torch.uint8 and y.tolist() == [1, 2, 2]
    assert torch.equal(x, torch.from_numpy(images[[7, 2, 5]]).permute(0, 3, 1, 2))
    x, y = read_set(jpg, chunk_bytes=4 * 3 * 20 * 24)
    assert y.tolist() == labels.tolist()
    assert (x.float() - torch.from_numpy(images).permute(0, 3, 1, 2).float()).abs().mean() < 2  # JPEG's loss only


def test_path_choice_and_its_errors(tmp_path, tagged):
    path, _ = tagged
    cpu = torch.device("cpu")
    assert choose_path("auto", path, None, cpu).resident
    assert not choose_path("off", path, None, cpu).resident
    need = N * 3 * 12 * 10 / 2**20
    with pytest.raises(DataError, match=r"--resident on: .* over the budget of 0 MiB"):
        choose_path("on", path, None, cpu, max_mib=need / 2)
    over = choose_path("auto", path, None, cpu, max_mib=need / 2)
    assert not over.resident and "exceed the budget" in over.note
    mixed = tmp_path / "mixed.beton"
    from fastpred.data.sources import open_source

    for k, (h, w) in enumerate([(10, 12), (14, 9), (10, 12)]):
        (tmp_path / "folder" / "c0").mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(tmp_path / "folder" / "c0" / f"{k}.png"), smooth_images(1, h, w)[0])
    write_beton(open_source(str(tmp_path / "folder")), mixed, compress_probability=0.0, workers=1)
    with pytest.raises(MixedSizes, match=r"--resident on: .* 2 sizes \(10x12, 14x9\)"):
        choose_path("on", mixed, None, cpu)
    assert not choose_path("auto", mixed, None, cpu).resident
    assert choose_path("on", mixed, np.array([0, 2]), cpu).resident  # the subset it would train on is one size
    with pytest.raises(MixedSizes):
        read_set(mixed)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


TRAIN = ["--batch-size", "64", "--max-steps", "2", "--log-every", "1", "--knn-every", "0", "--final-probe", "false",
         "--progress", "plain", "--proj-dim", "16"]


@pytest.mark.parametrize("resident", ["on", "off"])
def test_trainer_on_the_digits(tmp_path, cache, monkeypatch, capsys, resident, one_torch_thread):
    from fastpred.train.__main__ import main

    monkeypatch.setenv("FASTPRED_CACHE", cache)
    run = tmp_path / "run"
    assert main([*TRAIN, "--resident", resident, "--out", str(run)]) == 0
    note = json.loads((run / "env.json").read_text())["train_views"]
    assert note.startswith("device-resident: 1437 images of 32x32" if resident == "on" else "FFCV loader")
    assert f"training views: {note}" in capsys.readouterr().out
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in lines if r["kind"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(math.isfinite(r["loss"]) for r in train)
    assert train[0]["epoch"] == pytest.approx(1 / 22)  # 1437 digits in batches of 64: 22 steps either path


def test_importing_ffcv_keeps_torch_threads(tmp_path, monkeypatch):
    """FFCV sets torch's thread count to 1 at import (ffcv.pipeline.compiler); a resident run reads its .beton
    through FFCV and must keep the count it was given. A stand-in `ffcv` that does the same is imported here."""
    from fastpred.data.errors import require_ffcv

    (tmp_path / "ffcv").mkdir()
    (tmp_path / "ffcv" / "__init__.py").write_text("import torch\n\ntorch.set_num_threads(1)\n")
    monkeypatch.delitem(sys.modules, "ffcv")  # the real one comes back at teardown
    monkeypatch.syspath_prepend(str(tmp_path))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        require_ffcv()
        assert sys.modules["ffcv"].__file__ == str(tmp_path / "ffcv" / "__init__.py")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_trainer_errors_are_one_line(tmp_path, cache, monkeypatch, capsys):
    from fastpred.train.__main__ import main

    monkeypatch.setenv("FASTPRED_CACHE", cache)
    assert main([*TRAIN, "--resident", "on", "--resident-max-mb", "1", "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resident on: the training images take 4.2 MiB") and "\n" not in err
    assert not (tmp_path / "a").exists()
    assert main([*TRAIN, "--data", "synthetic", "--resident", "on", "--out", str(tmp_path / "b")]) == 2
    assert "--resident applies only with a .beton or a named source" in capsys.readouterr().err
