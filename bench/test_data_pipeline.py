"""Two 224-pixel views per image: this loader vs stock FFCV with two PipelineSpec outputs (two decodes) vs
torchvision ImageFolder + DataLoader + PIL; and the per-sample augmentations vs torchvision per sample.

Same JPEGs and cores for all: 2000 generated ImageNet-sized JPEGs by default (FASTPRED_BENCH_IMAGES to change;
generating them takes ~20 s on 2 cores). Results: extra_info["images_per_s"]. For a set that fits in memory
(28-pixel raw images, FASTPRED_BENCH_SMALL_IMAGES of them), the FFCV loader against the device-resident views.
"""

import os

import numpy as np
import pytest
import torch

N_IMAGES = int(os.environ.get("FASTPRED_BENCH_IMAGES", "2000"))
BATCH = 32
RES = 224
WORKERS = os.cpu_count() or 1


@pytest.fixture(scope="module")
def jpeg_tree(tmp_path_factory):
    """ImageNet-like JPEGs: 300-500 px sides, quality 90, textured enough to decode at a realistic cost."""
    from PIL import Image

    cv2 = pytest.importorskip("cv2")
    root = tmp_path_factory.mktemp("imagenet_like")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        h, w = int(rng.integers(300, 501)), int(rng.integers(300, 501))
        coarse = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        img = cv2.resize(coarse, (w, h), interpolation=cv2.INTER_CUBIC).astype(np.int16)
        img += rng.integers(-24, 25, (h, w, 3), dtype=np.int16)  # fine texture, like natural photos' detail
        d = root / f"c{i % 10}"
        d.mkdir(exist_ok=True)
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(d / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def beton(jpeg_tree, tmp_path_factory):
    pytest.importorskip("ffcv")
    from fastpred.data.sources import open_source
    from fastpred.data.write import write_beton

    path = tmp_path_factory.mktemp("beton") / "bench.beton"
    write_beton(open_source(str(jpeg_tree)), path, compress_probability=1.0, jpeg_quality=90, max_resolution=512)
    return path


def fastpred_epoch(path):
    from fastpred.data import TwoViewLoader

    loader = TwoViewLoader(path, BATCH, RES, num_workers=WORKERS, seed=0)

    def epoch():
        return sum(len(x1) for x1, _, _ in loader)

    return epoch


def ffcv_two_decodes_epoch(path):
    from ffcv.fields.basics import IntDecoder
    from ffcv.fields.rgb_image import RandomResizedCropRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline import PipelineSpec
    from ffcv.transforms import RandomHorizontalFlip, ToTensor, ToTorchImage

    def view():  # fresh operations per output: Loader pops the decoder out of the list it is given
        return dict(
            decoder=RandomResizedCropRGBImageDecoder((RES, RES)),
            transforms=[RandomHorizontalFlip(), ToTensor(), ToTorchImage()],
        )

    loader = Loader(
        str(path),
        batch_size=BATCH,
        num_workers=WORKERS,
        order=OrderOption.RANDOM,
        seed=0,
        pipelines={
            "image": PipelineSpec("image", **view()),
            "image2": PipelineSpec("image", **view()),
            "label": PipelineSpec("label", decoder=IntDecoder(), transforms=[ToTensor()]),
        },
    )

    def epoch():
        return sum(len(b[0]) for b in loader)

    return epoch


class _TwoViews:
    def __init__(self):
        from torchvision.transforms import v2

        self.t = v2.Compose([v2.RandomResizedCrop(RES, antialias=True), v2.RandomHorizontalFlip(), v2.PILToTensor()])

    def __call__(self, img):
        return self.t(img), self.t(img)


def torchvision_epoch(path):
    from torchvision.datasets import ImageFolder

    ds = ImageFolder(str(path), transform=_TwoViews())
    loader = torch.utils.data.DataLoader(
        ds, batch_size=BATCH, shuffle=True, num_workers=WORKERS, drop_last=True, persistent_workers=True
    )

    def epoch():
        return sum(len(x1) for (x1, _), _ in loader)

    return epoch


@pytest.mark.parametrize("impl", ["fastpred_one_decode", "ffcv_two_decodes", "torchvision_pil"])
def test_two_view_loading(benchmark, impl, beton, jpeg_tree):
    make = {
        "fastpred_one_decode": lambda: fastpred_epoch(beton),
        "ffcv_two_decodes": lambda: ffcv_two_decodes_epoch(beton),
        "torchvision_pil": lambda: torchvision_epoch(jpeg_tree),
    }[impl]
    epoch = make()
    n = benchmark.pedantic(epoch, rounds=2, warmup_rounds=1, iterations=1)  # warm-up pays numba compilation
    benchmark.extra_info.update(
        images_per_s=n / benchmark.stats.stats.mean, images=n, workers=WORKERS, res=RES, device="cpu"
    )


# A set that fits in memory (Fashion-MNIST's shape: 28 x 28, raw pixels): FFCV's loader against the device-resident
# views, one epoch of batch-256 two-view batches each. Random pixels: a raw image costs the same whatever it shows.
SMALL_N = int(os.environ.get("FASTPRED_BENCH_SMALL_IMAGES", "10000"))
SMALL_RES, SMALL_BATCH = 28, 256


@pytest.fixture(scope="module")
def small_beton(tmp_path_factory):
    pytest.importorskip("ffcv")
    from fastpred.data.sources import ArraySource
    from fastpred.data.write import write_beton

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (SMALL_N, SMALL_RES, SMALL_RES, 3), dtype=np.uint8)
    path = tmp_path_factory.mktemp("small") / "small.beton"
    write_beton(ArraySource(images, rng.integers(0, 10, SMALL_N), "28px"), path, compress_probability=0.0, workers=1)
    return path


@pytest.mark.parametrize("impl", ["fastpred_resident", "fastpred_ffcv"])
def test_small_set_two_views(benchmark, impl, small_beton):
    from bench.harness import DEVICE, sync
    from fastpred.data import TwoViewLoader
    from fastpred.data.resident import ResidentViews

    if impl == "fastpred_resident":
        views = ResidentViews.from_beton(small_beton, SMALL_BATCH, SMALL_RES, seed=0, device=DEVICE)
    else:
        views = TwoViewLoader(small_beton, SMALL_BATCH, SMALL_RES, num_workers=WORKERS, seed=0, device=DEVICE)

    def epoch():
        n = sum(len(x1) for x1, _, _ in views)
        sync()
        return n

    n = benchmark.pedantic(epoch, rounds=3, warmup_rounds=1, iterations=1)  # warm-up pays numba compilation
    benchmark.extra_info.update(images_per_s=n / benchmark.stats.stats.mean, images=n, batch=SMALL_BATCH,
                                res=SMALL_RES, threads=torch.get_num_threads(), device=DEVICE.type,
                                workers=WORKERS if impl == "fastpred_ffcv" else 0)


AUG_BATCH = 8 if not torch.cuda.is_available() else 256


@pytest.mark.parametrize("impl", ["fastpred_torch", "fastpred_triton", "torchvision_per_sample"])
def test_byol_augment(benchmark, impl):
    from fastpred.data.augment import BYOLAugment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if impl == "fastpred_triton" and device == "cpu":
        pytest.skip("the fused kernel is timed on CUDA only (on the CPU it runs in Triton's interpreter)")
    g = torch.Generator().manual_seed(0)
    x1, x2 = (
        torch.randint(0, 256, (AUG_BATCH, RES, RES, 3), generator=g, dtype=torch.uint8).permute(0, 3, 1, 2).to(device)
        for _ in range(2)
    )
    if impl.startswith("fastpred"):
        aug = BYOLAugment(backend=impl.split("_")[1])

        def run():
            out = aug(x1, x2)
            if device == "cuda":
                torch.cuda.synchronize()
            return out
    else:
        from torchvision.transforms import v2

        def pipeline(p_blur, p_sol):
            return v2.Compose(
                [
                    v2.ToDtype(torch.float32, scale=True),
                    v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                    v2.RandomGrayscale(p=0.2),
                    v2.RandomApply([v2.GaussianBlur(23, (0.1, 2.0))], p=p_blur),
                    v2.RandomSolarize(0.5, p=p_sol),
                    v2.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                ]
            )

        t1, t2 = pipeline(1.0, 0.0), pipeline(0.1, 0.2)

        def run():
            out = (torch.stack([t1(x) for x in x1]), torch.stack([t2(x) for x in x2]))
            if device == "cuda":
                torch.cuda.synchronize()
            return out

    benchmark.pedantic(run, rounds=3, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(
        images_per_s=AUG_BATCH / benchmark.stats.stats.mean,
        batch=AUG_BATCH,
        device=device,
        note="images/s counts image pairs (two views each)",
    )


# Fashion-MNIST's 60,000 training images (needs dataset-fashion-mnist): fastpred's two-view loader, stock FFCV with
# one view, torchvision per sample, and the device-resident views, 1 and 2 threads (`python -m bench.loaders_fmnist`
# prints the same as a table). One epoch per round after a warm-up epoch, which pays FFCV's numba compilation.
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("impl", ["fastpred_loader", "ffcv_one_view", "torchvision", "fastpred_resident"])
def test_fmnist_loaders(benchmark, impl, threads):
    pytest.importorskip("ffcv")
    from bench import loaders_fmnist
    from fastpred.data.errors import DataError

    try:
        loaders_fmnist.betons()
    except DataError as e:
        pytest.skip(f"no Fashion-MNIST: {e}")
    epoch = loaders_fmnist.make_epoch(impl, threads)
    n = benchmark.pedantic(epoch, rounds=1, warmup_rounds=1, iterations=1)
    benchmark.extra_info.update(images_per_s=n / benchmark.stats.stats.mean, images=n, threads=threads,
                                views=loaders_fmnist.VIEWS.get(impl, 2), batch=loaders_fmnist.BATCH,
                                res=loaders_fmnist.RES, device="cpu", load_average=os.getloadavg()[0])
