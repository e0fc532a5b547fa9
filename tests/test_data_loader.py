"""Writer and loaders: round trips, one-decode two-crop views against a decode of the original, shards,
and bad input giving one line and a non-zero exit."""

import os
import subprocess
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ffcv", reason="the data pipeline needs fastpred[data]")

from fastpred.data import DataError, EvalLoader, TwoViewLoader  # noqa: E402
from fastpred.data.sources import ArraySource, digits, open_source  # noqa: E402
from fastpred.data.write import write_beton  # noqa: E402

SIZES = [(40, 60), (97, 33), (64, 64), (128, 80), (33, 150), (75, 75), (50, 120), (90, 45), (31, 31)]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """An ImageFolder tree of smooth JPEGs of mixed sizes (smooth, so a wrong crop shows as a large error)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    for k, (h, w) in enumerate(SIZES):
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w) + rng.uniform(0, 100)], -1)
        cls = root / f"class_{k % 3}"
        cls.mkdir(exist_ok=True)
        Image.fromarray(img.astype(np.uint8)).save(cls / f"img_{k}.jpg", quality=95)
    return root


@pytest.fixture(scope="module")
def betons(tmp_path_factory, jpeg_folder):
    d = tmp_path_factory.mktemp("beton")
    out = {"digits": d / "digits.beton", "jpg": d / "jpg.beton", "raw": d / "raw.beton"}
    write_beton(digits("train"), out["digits"], compress_probability=0.0, workers=2)
    write_beton(open_source(str(jpeg_folder)), out["jpg"], compress_probability=1.0, jpeg_quality=90, workers=2)
    write_beton(open_source(str(jpeg_folder)), out["raw"], compress_probability=0.0, workers=2)
    return out


def test_digits_round_trip(betons):
    src = digits("train")
    assert len(src) == 1437 and src.images.shape[1:] == (32, 32, 3)
    xs, ys = [], []
    for x, y in EvalLoader(betons["digits"], 256, 32, crop_ratio=1.0, num_workers=2):
        xs.append(x.clone())
        ys.append(y.clone())
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (1437, 3, 32, 32) and x.dtype == torch.uint8
    assert torch.equal(x, torch.from_numpy(src.images).permute(0, 3, 1, 2))
    assert torch.equal(y, torch.from_numpy(src.labels))


def test_folder_round_trip_labels_and_sizes(betons, jpeg_folder):
    from ffcv.reader import Reader

    src = open_source(str(jpeg_folder))
    meta = Reader(str(betons["jpg"])).metadata
    sizes = [(int(m["f0"]["height"]), int(m["f0"]["width"])) for m in meta]
    assert sizes == [src[i][0].shape[:2] for i in range(len(src))]
    assert (meta["f0"]["mode"] == 0).all()  # all JPEG with compress_probability 1
    ys = torch.cat([y.clone() for _, y in EvalLoader(betons["jpg"], 4, 16, num_workers=1)])
    assert ys.tolist() == [label for _, label in src.samples]


def area_resize(crop: np.ndarray, size: int) -> np.ndarray:
    """The decoder's documented resize, spelled out with OpenCV's Python API."""
    from fastpred.data.decode import halves_through_double

    crop = np.ascontiguousarray(crop)
    if halves_through_double(*crop.shape[:2], size, size):
        crop = cv2.resize(crop, (2 * size, 2 * size), interpolation=cv2.INTER_AREA)
    return cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)


def reference_view(image: np.ndarray, prm, size: int) -> np.ndarray:
    i, j, h, w, flip = (int(v) for v in prm)
    view = area_resize(image[i : i + h, j : j + w], size)
    return view[:, ::-1] if flip else view


@pytest.mark.parametrize("shape", [(300, 300), (400, 250), (225, 447), (448, 448)])
def test_two_step_resize_is_the_area_filter(shape):
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = cv2.resize(coarse, shape[::-1], interpolation=cv2.INTER_CUBIC).astype(np.int16)
    image = np.clip(image + rng.integers(-24, 25, image.shape), 0, 255).astype(np.uint8)
    direct = cv2.resize(image, (224, 224), interpolation=cv2.INTER_AREA).astype(int)
    diff = np.abs(area_resize(image, 224).astype(int) - direct)
    assert diff.mean() < 0.5 and np.percentile(diff, 99) <= 4, (diff.mean(), np.percentile(diff, 99))


@pytest.mark.parametrize("stored", ["raw", "jpg"])
def test_two_views_are_crops_of_the_same_image(betons, jpeg_folder, stored):
    from ffcv.fields.rgb_image import encode_jpeg

    src = open_source(str(jpeg_folder))
    size = 24
    loader = TwoViewLoader(betons[stored], 3, size, order="sequential", drop_last=False, num_workers=2,
                           return_params=True)
    assert len(loader) == 3
    seen = 0
    flips = []
    for _ in range(3):
        for b, (x1, x2, y, prm) in enumerate(loader):
            assert x1.shape == x2.shape == (len(y), 3, size, size) and x1.dtype == torch.uint8
            for k in range(len(y)):
                image = src[b * 3 + k][0]
                if stored == "jpg":  # the writer's own JPEG, decoded by OpenCV's libjpeg (not FFCV's)
                    image = cv2.imdecode(encode_jpeg(image, 90), cv2.IMREAD_COLOR)[..., ::-1]
                for v, x in enumerate((x1, x2)):
                    p = prm[k, v].numpy()
                    i, j, h, w, _ = p
                    assert 0 <= i and 0 <= j and i + h <= image.shape[0] and j + w <= image.shape[1]
                    got = x[k].permute(1, 2, 0).numpy().astype(int)
                    err = np.abs(got - reference_view(image, p, size)).mean()
                    if stored == "raw":
                        assert err == 0
                    else:
                        assert err < 1.5, (b, k, v, err)
                    flips.append(p[4])
                    seen += 1
            assert not torch.equal(prm[:, 0], prm[:, 1])  # the two views are drawn independently
    assert seen == 2 * 3 * len(src) and 0 < np.mean(flips) < 1


def test_dataset_larger_than_batch_and_orders(betons):
    for order in ["random", "quasi_random", "sequential"]:
        loader = TwoViewLoader(betons["digits"], 100, 16, order=order, num_workers=2, os_cache=order != "quasi_random")
        assert len(loader) == 1437 // 100  # drop_last
        n = sum(len(y) for _, _, y in loader)
        assert n == 1400


def labelled_beton(path, n):
    rng = np.random.default_rng(n)
    write_beton(ArraySource(rng.integers(0, 255, (n, 8, 8, 3), dtype=np.uint8), np.arange(n), "ids"), path, workers=1)


@pytest.mark.parametrize("n,world", [(24, 4), (30, 4), (7, 3), (5, 8)])
def test_shard_order_disjoint_and_covering(n, world):
    from types import SimpleNamespace

    from fastpred.data.loader import _shard_order

    fake = SimpleNamespace(indices=np.arange(100, 100 + n), seed=3)
    for epoch in range(3):
        shards = [_shard_order(r, world, shuffle=True)(fake).sample_order(epoch).tolist() for r in range(world)]
        per_rank = -(-n // world)
        assert all(len(s) == per_rank for s in shards)  # equal lengths keep DDP ranks in step
        union = sum(shards, [])
        assert set(union) == set(range(100, 100 + n))
        assert len(union) - len(set(union)) == per_rank * world - n  # only the cyclic padding repeats
        if n % world == 0:
            assert len(set(union)) == len(union)


def test_distributed_loaders_partition_the_data(tmp_path):
    path = tmp_path / "ids.beton"
    labelled_beton(path, 10)
    loaders = [TwoViewLoader(path, 2, 8, rank=r, world_size=2, drop_last=False, seed=3, num_workers=1)
               for r in range(2)]
    epochs = []
    for _ in range(2):
        shards = [torch.cat([y.clone() for _, _, y in loader]).tolist() for loader in loaders]
        assert sorted(shards[0] + shards[1]) == list(range(10))
        epochs.append(shards)
    assert epochs[0] != epochs[1]  # reshuffled every epoch, consistently across ranks


def test_bad_loader_inputs(tmp_path, betons):
    with pytest.raises(DataError, match="no such file"):
        TwoViewLoader(tmp_path / "missing.beton", 8)
    junk = tmp_path / "junk.beton"
    junk.write_bytes(os.urandom(5000))
    with pytest.raises(DataError, match="not a .beton"):
        TwoViewLoader(junk, 8)
    with pytest.raises(DataError, match="field 'pixels' not in"):
        TwoViewLoader(betons["digits"], 8, image_field="pixels")
    with pytest.raises(DataError, match="gives no batches"):
        TwoViewLoader(betons["digits"], 5000)
    with pytest.raises(DataError, match="empty dataset"):
        write_beton(ArraySource(np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0), "none"), tmp_path / "e.beton")
    empty = tmp_path / "empty.beton"
    empty.write_bytes(betons["digits"].read_bytes())
    from ffcv.types import HeaderType

    header = np.fromfile(empty, dtype=HeaderType, count=1)
    header["num_samples"] = 0
    with open(empty, "r+b") as f:
        f.write(header.tobytes())
    with pytest.raises(DataError, match="empty dataset"):
        EvalLoader(empty, 8)


def run_cli(*args):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, timeout=120)


def one_error_line(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1 and lines[0].startswith("error: "), (r.returncode, r.stderr)
    return lines[0]


def test_cli_bad_input_one_line_subprocess(tmp_path):
    # Both fail before FFCV is imported, so these subprocesses are cheap.
    r = run_cli("-m", "fastpred.data.write", str(tmp_path / "nope"), str(tmp_path / "o.beton"))
    assert "source not found" in one_error_line(r)
    r = run_cli("-m", "fastpred.data.check", str(tmp_path / "nope.beton"))
    assert "no such file" in one_error_line(r)


def test_cli_bad_input_one_line(tmp_path, betons, capsys):
    from fastpred.data import check, write

    (tmp_path / "empty_tree" / "cls").mkdir(parents=True)
    junk = tmp_path / "junk.beton"
    junk.write_bytes(b"not a beton" * 100)
    cases = [
        (write.main, [str(tmp_path / "empty_tree"), str(tmp_path / "o.beton")], "empty dataset"),
        (write.main, [str(tmp_path / "a_file.txt"), str(tmp_path / "o.beton")], "source not found"),
        (write.main, ["digits", str(betons["digits"])], "--force"),
        (write.main, ["digits", str(tmp_path / "no_dir" / "o.beton")], "output folder does not exist"),
        (write.main, [str(tmp_path / "empty_tree"), str(tmp_path / "o.beton"), "--split", "val"], "--split"),
        (check.main, [str(junk)], "not a .beton"),
        (check.main, [str(betons["digits"]), "--image-field", "img"], "field 'img'"),
        (check.main, [str(betons["digits"]), "--label-field", "image"], "expected IntField"),
    ]
    for main, args, msg in cases:
        capsys.readouterr()
        rc = main(args)
        err = capsys.readouterr().err.strip().splitlines()
        assert rc != 0 and len(err) == 1 and err[0].startswith("error: ") and msg in err[0], (args, rc, err)
    assert not (tmp_path / "o.beton").exists()


def test_cli_writes_atomically_and_force(tmp_path, capsys):
    from fastpred.data import check

    out = tmp_path / "d.beton"
    r = run_cli("-m", "fastpred.data.write", "digits", str(out), "--split", "test", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.beton"]  # no temporary file left behind
    r = run_cli("-m", "fastpred.data.write", "digits", str(out), "--split", "all", "--force", "--workers", "2")
    assert r.returncode == 0, r.stderr
    assert check.main([str(out), "--batch-size", "500", "--resolution", "16"]) == 0
    assert "1797 samples" in capsys.readouterr().out


def _epochs(loader, epochs):
    """Every batch of `epochs` epochs as numpy copies (the loader's buffers are reused)."""
    return [(x1.numpy().copy(), x2.numpy().copy(), y.numpy().copy(), p.numpy().copy())
            for _ in range(epochs) for x1, x2, y, p in loader]


def test_seeded_crops_do_not_depend_on_workers_and_differ_per_epoch(betons):
    def run(workers, seed):
        return _epochs(TwoViewLoader(betons["jpg"], 3, 16, num_workers=workers, seed=seed, return_params=True), 2)

    one, two, other_seed = run(1, 5), run(2, 5), run(1, 6)
    assert len(one) == len(two) == 2 * (len(SIZES) // 3)
    for a, b in zip(one, two, strict=True):
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(u, v)
    assert any((a[3] != b[3]).any() for a, b in zip(one, other_seed, strict=True))
    half = len(one) // 2
    # The same images (labels) in a new epoch get new crops.
    by_label = lambda batches: {tuple(p.ravel()) for _, _, _, p in batches}  # noqa: E731
    assert by_label(one[:half]).isdisjoint(by_label(one[half:]))


def test_set_epoch_resumes_mid_epoch(betons):
    def loader():
        return TwoViewLoader(betons["digits"], 100, 16, num_workers=2, seed=3, return_params=True)

    full = _epochs(loader(), 3)
    per_epoch = len(full) // 3
    resumed = loader()
    resumed.set_epoch(1, skip_batches=4)
    tail = _epochs(resumed, 2)
    assert len(tail) == 2 * per_epoch - 4
    for a, b in zip(full[per_epoch + 4 :], tail, strict=True):
        for u, v in zip(a, b, strict=True):
            np.testing.assert_array_equal(u, v)


def hflip_before(img):
    """The decoder's flip as it was (one byte at a time): the new one must give the same bytes."""
    height, width = img.shape[0], img.shape[1]
    for r in range(height):
        for c in range(width // 2):
            d = width - 1 - c
            for k in range(3):
                t = img[r, c, k]
                img[r, c, k] = img[r, d, k]
                img[r, d, k] = t


def test_hflip_gives_the_same_bytes_as_before():
    from ffcv.pipeline.compiler import Compiler

    from fastpred.data.decode import hflip_

    new, old = Compiler.compile(hflip_), Compiler.compile(hflip_before)
    rng = np.random.default_rng(0)
    for shape in [(224, 224), (1, 1), (3, 2), (5, 7), (2, 223), (31, 64), (0, 5), (4, 0)]:
        img = rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
        a, b = img.copy(), img.copy()
        new(a)
        old(b)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, img[:, ::-1])
        # In place on a view of a larger buffer, as the decoder calls it on destination[sample, view].
        buffer = np.stack([img, img])[None]  # (1, 2, H, W, 3)
        new(buffer[0, 1])
        np.testing.assert_array_equal(buffer[0, 1], img[:, ::-1])
        np.testing.assert_array_equal(buffer[0, 0], img)


def test_flipped_views_from_a_second_loader(betons, jpeg_folder):
    """Every view flipped, by a loader built after another one. Building a loader makes FFCV mark numba's shared
    1-D uint8 array type read-only, and a flip that wrote through a 1-D array failed to compile in the second
    loader's worker thread, leaving the iteration waiting (hence the deadline)."""
    from test_data_write import deadline

    src = open_source(str(jpeg_folder))
    with deadline(120):
        for _ in range(2):
            loader = TwoViewLoader(betons["raw"], 3, 24, order="sequential", flip_prob=1.0, num_workers=1,
                                   return_params=True)
            x1, x2, _, prm = next(iter(loader))
            assert prm[:, :, 4].all()
            for k in range(3):
                for v, x in enumerate((x1, x2)):
                    want = reference_view(src[k][0], prm[k, v].numpy(), 24)
                    np.testing.assert_array_equal(x[k].permute(1, 2, 0).numpy(), want)


def test_decoder_memory_does_not_grow_with_images_batch_or_slots(tmp_path):
    """FFCV allocates each query for batch x (batches_ahead + 2) samples; only the views may be among them. The
    decoded source image and the double-size crop are per-thread scratch, whatever the images' size."""
    import torch
    from ffcv.pipeline.state import State
    from ffcv.reader import Reader

    from fastpred.data.decode import TwoCropRGBImageDecoder

    path = tmp_path / "big.beton"
    write_beton(ArraySource(np.zeros((2, 480, 640, 3), np.uint8), np.arange(2), "big"), path, workers=1,
                max_resolution=0)
    decoder = TwoCropRGBImageDecoder((224, 224))
    decoder.metadata = Reader(str(path)).metadata["f0"]
    state, queries = decoder.declare_state_and_memory(State(False, torch.device("cpu"), None, None))
    per_sample = sum(int(np.prod(q.shape)) * np.dtype(q.dtype).itemsize for q in queries)
    assert per_sample == 2 * 224 * 224 * 3 + 2 * 5 * 4  # two views and their crop parameters
    assert decoder.scratch_bytes() == (480 * 640 * 3, 448 * 448 * 3)
