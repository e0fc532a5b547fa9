"""The .beton writer: photos larger than a page, every image where it belongs, failures of any kind in a writer
process ending the write with one line and no file, --skip-bad, and Ctrl-C leaving nothing behind.

Every test that runs writer processes has a deadline: a writer that hangs fails the test instead of blocking."""

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("ffcv", reason="the data pipeline needs fastpred[data]")

from fastpred.data import DataError  # noqa: E402
from fastpred.data.sources import ArraySource, open_source  # noqa: E402
from fastpred.data.write import DEFAULT_MAX_RESOLUTION, MIN_PAGE_SIZE, main, page_size_for, write_beton  # noqa: E402

JPG, RAW = 0, 1  # FFCV's IMAGE_MODES


@contextlib.contextmanager
def deadline(seconds: float):
    """Fails the test (TimeoutError in the main thread) if the block runs longer than `seconds`."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s: something hangs")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def photo(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like RGB image: smooth noise at several scales, so JPEG sizes are those of real photos."""
    rng = np.random.default_rng(seed)
    img = np.zeros((h, w, 3), np.float32)
    for k, cells in enumerate((4, 16, 64, 256), start=1):
        layer = rng.normal(0, 1, (max(2, h * cells // w), cells, 3)).astype(np.float32)
        img += cv2.resize(layer, (w, h), interpolation=cv2.INTER_CUBIC) * (60 / k)
    return np.clip(img + 128, 0, 255).astype(np.uint8)


def stored_images(path: Path) -> tuple[np.ndarray, list[np.ndarray | None], np.ndarray]:
    """(modes, raw images or None for JPEGs, labels) read straight from the file's metadata and pages."""
    from ffcv.reader import Reader

    reader = Reader(str(path))
    meta, labels = reader.metadata["f0"], reader.metadata["f1"]
    images = []
    for m in meta:
        h, w = int(m["height"]), int(m["width"])
        images.append(np.fromfile(path, np.uint8, h * w * 3, offset=int(m["data_ptr"])).reshape(h, w, 3)
                      if m["mode"] == RAW else None)
    return meta["mode"].copy(), images, labels.copy()


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if name in p.name)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four 2048x1536 photos and one 4000x3000, as JPEGs in two classes (about 1-3 MB each)."""
    root = tmp_path_factory.mktemp("photos")
    shapes = [(1536, 2048)] * 4 + [(3000, 4000)]
    for k, (h, w) in enumerate(shapes):
        (root / f"c{k % 2}").mkdir(exist_ok=True)
        Image.fromarray(photo(h, w, k)).save(root / f"c{k % 2}" / f"p{k}.jpg", quality=90)
    return root


def test_page_size_holds_the_largest_raw_image():
    assert page_size_for(DEFAULT_MAX_RESOLUTION, None) == MIN_PAGE_SIZE == 8 << 20
    assert page_size_for(2048, None) == 16 << 20  # 2048^2 x 3 = 12 MiB
    assert page_size_for(None, 4000 * 3000) == 64 << 20  # 34 MiB raw
    assert page_size_for(None, None) == MIN_PAGE_SIZE
    with pytest.raises(DataError, match="--max-resolution 26754 or less"):
        page_size_for(30000, None)


def test_large_photos_with_the_default_flags(photos, tmp_path, capsys):
    # Before: half of these were stored raw, above FFCV's 8 MiB page, and the writer waited forever.
    out = tmp_path / "photos.beton"
    with deadline(120):
        assert main([str(photos), str(out), "--workers", "2"]) == 0
    assert "wrote 5 images" in capsys.readouterr().out
    modes, raw, labels = stored_images(out)
    assert set(modes) == {JPG, RAW}  # the default 50% JPEG stores both kinds
    src = open_source(str(photos))
    assert labels.tolist() == [label for _, label in src.samples]
    for image, (path, _) in zip(raw, src.samples, strict=True):
        if image is not None:  # shrunk to 500 on the longer side with FFCV's own area filter, pixel for pixel
            original = np.asarray(Image.open(path).convert("RGB"))
            h, w = original.shape[:2]
            expected = cv2.resize(original, (500, 500 * h // w), interpolation=cv2.INTER_AREA)
            np.testing.assert_array_equal(image, expected)
    assert leftovers(tmp_path, "photos") == ["photos.beton"]


@pytest.mark.parametrize("compress", ["0", "1"])
def test_full_size_photos_fit_a_page(photos, tmp_path, compress):
    """--max-resolution 0 keeps the 4000x3000 photo (34 MiB raw): the pages grow to hold it, raw or JPEG."""
    out = tmp_path / "full.beton"
    with deadline(120):
        assert main([str(photos), str(out), "--workers", "2", "--max-resolution", "0",
                     "--compress-probability", compress]) == 0
    from ffcv.reader import Reader

    reader = Reader(str(out))
    assert int(reader.page_size) == 64 << 20
    sizes = [(int(m["height"]), int(m["width"])) for m in reader.metadata["f0"]]
    assert sizes == [(1536, 2048)] * 2 + [(3000, 4000), (1536, 2048), (1536, 2048)]  # c0: p0 p2 p4, c1: p1 p3
    modes, raw, _ = stored_images(out)
    assert set(modes) == ({RAW} if compress == "0" else {JPG})
    if compress == "0":
        np.testing.assert_array_equal(raw[2], np.asarray(Image.open(photos / "c0" / "p4.jpg").convert("RGB")))


class Unsized:
    """A source that cannot tell its image sizes in advance (the writer keeps FFCV's 8 MiB page)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], i


def test_raw_above_a_page_is_stored_as_jpeg_and_one_too_big_either_way_is_an_error(tmp_path):
    smooth = photo(1800, 1800, 0)  # 9.3 MiB raw: above the 8 MiB page
    out = tmp_path / "u.beton"
    with deadline(60):
        write_beton(Unsized([smooth]), out, max_resolution=0, compress_probability=0.0, workers=1)
    assert stored_images(out)[0].tolist() == [JPG]
    noise = np.random.default_rng(0).integers(0, 256, (2400, 2400, 3), dtype=np.uint8)  # ~11 MB at JPEG q100
    too_big = "cannot store sample 1 of the source: 2400x2400 takes .* even as JPEG, more than a page"
    with deadline(60), pytest.raises(DataError, match=too_big):
        write_beton(Unsized([smooth, noise]), tmp_path / "n.beton", max_resolution=0, jpeg_quality=100, workers=1)
    assert leftovers(tmp_path, "n.beton") == []


class Failing:
    """Small images; image `bad` fails in the writer process the way `how` says."""

    def __init__(self, how: str, bad: int = 5, n: int = 12):
        self.how, self.bad, self.n, self.parent = how, bad, n, os.getpid()

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i == self.bad and os.getpid() != self.parent:
            if self.how == "raise":
                raise RuntimeError("boom")
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.how == "exit":
                sys.exit(3)  # a BaseException, outside any `except Exception`
            if self.how == "label":
                return np.zeros((4, 4, 3), np.uint8), "cat"
        return np.full((4, 4, 3), i, np.uint8), i


@pytest.mark.parametrize("how,message", [
    ("raise", "cannot read sample 5 of the source: boom"),
    ("label", "cannot store sample 5 of the source: the label 'cat' is not an integer"),
    ("kill", "a writer process died (killed by SIGKILL); nothing written"),
    ("exit", "a writer process failed: SystemExit: 3; nothing written"),
])
def test_any_failure_in_a_writer_process_ends_the_write(tmp_path, how, message):
    out = tmp_path / "f.beton"
    with deadline(60), pytest.raises(DataError) as e:
        write_beton(Failing(how), out, workers=2)
    assert str(e.value) == message
    assert leftovers(tmp_path, "f.beton") == []  # neither the file nor its temporary


def test_skip_bad_with_nothing_readable_is_an_error(tmp_path):
    class Unreadable(Failing):
        def __getitem__(self, i):
            raise OSError(f"unreadable {i}")

    with deadline(60), pytest.raises(DataError) as e:
        write_beton(Unreadable("raise", n=3), tmp_path / "none.beton", workers=2, skip_bad=True)
    first = "sample 0 of the source: cannot read: unreadable 0"
    assert str(e.value) == f"none of the 3 images could be written; the first, {first}"
    assert leftovers(tmp_path, "none") == []


@pytest.fixture
def damaged_tree(tmp_path):
    """Three classes of 3 images, each filled with a colour coding its class and index; c0 also holds a truncated
    JPEG and c2 a text file named .png. Returns (root, the readable images in writing order with their labels)."""
    root = tmp_path / "src"
    readable = []
    for c in range(3):
        (root / f"c{c}").mkdir(parents=True)
        for k in range(3):
            img = np.zeros((6, 8, 3), np.uint8) + np.array([40 * c, 20 * k, 7], np.uint8)
            Image.fromarray(img).save(root / f"c{c}" / f"i{k}.png")
            readable.append((img, c))
    Image.fromarray(photo(64, 64, 1)).save(root / "c0" / "trunc.jpg", quality=90)
    (root / "c0" / "trunc.jpg").write_bytes((root / "c0" / "trunc.jpg").read_bytes()[:300])
    (root / "c2" / "notes.png").write_text("not an image")
    return root, readable


def test_bad_image_is_one_error_line_and_nothing_written(damaged_tree, tmp_path, capsys):
    root, _ = damaged_tree
    out = tmp_path / "d.beton"
    with deadline(60):
        assert main([str(root), str(out), "--workers", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: cannot read {root / 'c0' / 'trunc.jpg'}: "), err
    assert leftovers(tmp_path, "d.beton") == []


def test_skip_bad_writes_the_readable_images_with_their_labels(damaged_tree, tmp_path, capsys):
    root, readable = damaged_tree
    out = tmp_path / "d.beton"
    with deadline(60):
        assert main([str(root), str(out), "--workers", "2", "--skip-bad", "--compress-probability", "0"]) == 0
    assert "skipped 2 images that could not be read or stored: see" in capsys.readouterr().out
    listed = (tmp_path / "d.beton.skipped.txt").read_text().splitlines()
    assert [line.split("\t")[0] for line in listed] == [str(root / "c0" / "trunc.jpg"), str(root / "c2" / "notes.png")]
    assert all(line.split("\t")[1].startswith("cannot read: ") for line in listed)
    modes, images, labels = stored_images(out)
    assert (modes == RAW).all() and labels.tolist() == [label for _, label in readable]
    for got, (want, _) in zip(images, readable, strict=True):
        np.testing.assert_array_equal(got, want)
    assert leftovers(tmp_path, "d.beton") == ["d.beton", "d.beton.skipped.txt"]


def test_skip_bad_keeps_labels_through_the_loader(tmp_path):
    """The compacted file reads back through the loader: every label with its own image, skipped ones gone."""
    from fastpred.data import EvalLoader

    class Some(ArraySource):
        def __getitem__(self, i):
            if i % 3 == 1:
                raise OSError("unreadable")
            return super().__getitem__(i)

    n = 40
    images = np.repeat(np.arange(n, dtype=np.uint8)[:, None, None, None] * 5, 8, axis=1).repeat(8, 2).repeat(3, 3)
    out = tmp_path / "s.beton"
    with deadline(60):
        kept = write_beton(Some(images, np.arange(n) + 100, "some"), out, workers=2, skip_bad=True,
                           compress_probability=0.0)
    keep = [i for i in range(n) if i % 3 != 1]
    assert kept == len(keep) and len((tmp_path / "s.beton.skipped.txt").read_text().splitlines()) == n - kept
    batches = [(x.clone(), y.clone()) for x, y in EvalLoader(out, 8, 8, crop_ratio=1.0, num_workers=1)]
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    assert y.tolist() == [i + 100 for i in keep]
    assert x[:, 0, 0, 0].tolist() == [5 * i for i in keep]  # each image is still the one its label names


def _writer_processes(marker: str) -> list[int]:
    """Pids of live processes whose command line names `marker` (the writer and any worker it forked)."""
    pids = []
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and marker in (proc / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(proc.name))
    return pids


def blocked_tree(tmp_path: Path) -> Path:
    """Six JPEGs and a named pipe that nobody writes: the worker reading the pipe blocks, so the write is surely
    under way when the signal comes, as with a slow disk."""
    root = tmp_path / "src" / "c0"
    root.mkdir(parents=True)
    for k in range(6):
        Image.fromarray(photo(64, 64, k)).save(root / f"i{k}.jpg")
    os.mkfifo(root / "zz_blocks.jpg")
    return tmp_path / "src"


def wait_for_temporary(tmp_path: Path, name: str, alive) -> None:
    start = time.monotonic()
    while not leftovers(tmp_path, f".{name}.tmp"):  # the write has begun
        assert alive() and time.monotonic() - start < 120, "the writer ended or never started writing"
        time.sleep(0.05)
    time.sleep(0.5)  # let the workers reach the images


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_ctrl_c_leaves_no_partial_file(tmp_path):
    out = tmp_path / "interrupted.beton"
    proc = subprocess.Popen([sys.executable, "-m", "fastpred.data.write", str(blocked_tree(tmp_path)), str(out),
                             "--workers", "2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_temporary(tmp_path, out.name, lambda: proc.poll() is None)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT, err
    assert err.strip().splitlines() == ["error: interrupted (SIGINT); nothing written"]
    assert leftovers(tmp_path, "interrupted") == []
    time.sleep(0.2)
    assert _writer_processes(str(out)) == []  # no worker outlives the writer


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs a named pipe")
def test_sigterm_leaves_no_partial_file(tmp_path, capsys):
    """In this process (cheaper than a new one): SIGTERM to the writer, from a thread once the write has begun."""
    import multiprocessing as mp
    import threading

    out = tmp_path / "terminated.beton"
    sender = threading.Thread(target=lambda: (wait_for_temporary(tmp_path, out.name, lambda: True),
                                              os.kill(os.getpid(), signal.SIGTERM)))
    sender.start()
    with deadline(120):
        rc = main([str(blocked_tree(tmp_path)), str(out), "--workers", "2"])
    sender.join()
    assert rc == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().splitlines() == ["error: interrupted (SIGTERM); nothing written"]
    assert leftovers(tmp_path, "terminated") == [] and mp.active_children() == []
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # main gives the handler back


_FORK_WINDOW = r"""
import multiprocessing as mp, os, signal, sys, time
from fastpred.data.write import _start

def child():  # as the writer's _worker begins: its own handlers, then the signals unblocked
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})
    time.sleep(30)

def parent_handler(signum, frame):
    raise RuntimeError(f"parent handler ran in process {os.getpid()}")

signal.signal(signal.SIGTERM, parent_handler)
parent = os.getpid()
os.register_at_fork(after_in_child=lambda: os.kill(os.getpid(), signal.SIGTERM))  # a SIGTERM in the fork window
p = mp.get_context("fork").Process(target=child)
_start([p])
p.join(20)
print("parent" if os.getpid() == parent else "child-unwound", p.exitcode if os.getpid() == parent else "", flush=True)
"""


def test_a_signal_in_the_fork_window_waits_for_the_workers_handlers(tmp_path):
    # A SIGTERM that reaches a worker between fork() and its first line (the clean-up after another worker's bad
    # image) must end that worker, not run the parent's handler in the child and unwind the parent's write there.
    script = tmp_path / "fork_window.py"
    script.write_text(_FORK_WINDOW)
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert done.stdout.split() == ["parent", str(-signal.SIGTERM)], (done.stdout, done.stderr[-2000:])


def test_small_images_are_stored_raw_by_default(tmp_path):
    """Without --compress-probability, images of at most 64 px a side are stored raw (JPEG costs them no accuracy
    but halves their loading speed), larger ones half JPEG; the flag given overrides the default at any size."""
    from fastpred.data.write import SMALL_RAW_SIDE

    labels = np.arange(24) % 3
    for side, expected in ((28, {RAW}), (SMALL_RAW_SIDE, {RAW}), (SMALL_RAW_SIDE + 1, {JPG, RAW})):
        images = np.stack([photo(side, side, seed) for seed in range(24)])
        out = tmp_path / f"{side}.beton"
        write_beton(ArraySource(images, labels, f"{side}px"), out, workers=1)
        modes, raw, stored = stored_images(out)
        assert set(modes.tolist()) == expected, side
        assert stored.tolist() == labels.tolist()
        for image, original, mode in zip(raw, images, modes, strict=True):
            if mode == RAW:
                np.testing.assert_array_equal(image, original)
    small = np.stack([photo(28, 28, seed) for seed in range(24)])
    write_beton(ArraySource(small, labels, "28px"), tmp_path / "jpeg.beton", compress_probability=1.0, workers=1)
    assert set(stored_images(tmp_path / "jpeg.beton")[0].tolist()) == {JPG}
    with pytest.raises(DataError, match="--compress-probability must be in"):
        write_beton(ArraySource(small, labels, "28px"), tmp_path / "bad.beton", compress_probability=1.5, workers=1)
