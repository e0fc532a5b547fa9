"""Raw-pixel baselines of a named data set, measured with scikit-learn on the same split the trainer's probes use.

The ablation's table sets every self-supervised number beside what a classifier gets from the pixels alone: if a
pretrained backbone's linear probe does not beat a linear model on pixels, the pretraining taught nothing. The
classifiers and their settings (the Fashion-MNIST paper, Xiao, Rasul, Vollgraf 2017, published 0.842 / 0.860 /
0.897 for its best logistic regression, kNN and RBF SVC on these pixels):

- logistic regression: multinomial, lbfgs, C = 1, on pixels scaled to [0, 1], at most 300 iterations;
- kNN: k = 5, Euclidean, uniform votes, on pixels in [0, 1] (brute force: 10,000 x 60,000 distances);
- RBF SVC stand-in: an exact RBF SVC on 60,000 images takes hours on two cores (O(N^2) kernel rows), so the
  kernel is approximated with a 2,000-feature Nystroem map (gamma = 1 / (784 var(X)), sklearn's "scale"), then a
  linear SVM (C = 10) on it: the same model class, an approximated kernel. `--svc exact` runs the exact SVC
  (C = 10, gamma "scale") when the time is there.

Results are cached as JSON (a finished classifier is not run again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

CLASSIFIERS = ("logistic", "knn", "svc")


def pixels(name: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(N, H*W*3) float32 pixels in [0, 1] and (N,) labels of a named source's split, as the trainer stores them."""
    from fastpred.data.named import NAMED_SOURCES

    source = NAMED_SOURCES[name].source(split)
    pairs = [source[i] for i in range(len(source))]  # each image read once: a source builds it on every access
    images = np.stack([image for image, _ in pairs])
    labels = np.asarray([label for _, label in pairs])
    if images.ndim == 4 and (images == images[..., :1]).all():  # grey stored as three equal channels: one is enough
        images = images[..., 0]
    return images.reshape(len(images), -1).astype(np.float32) / 255.0, labels


def build(kind: str, *, svc: str, seed: int):
    """The scikit-learn estimator of a classifier name, with the settings the module docstring states."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    if kind == "logistic":
        return LogisticRegression(C=1.0, max_iter=300)
    if kind == "knn":
        return KNeighborsClassifier(n_neighbors=5, algorithm="brute")
    if kind == "svc":
        from sklearn.svm import SVC

        if svc == "exact":
            return SVC(C=10.0, kernel="rbf", gamma="scale")
        from sklearn.kernel_approximation import Nystroem
        from sklearn.pipeline import make_pipeline
        from sklearn.svm import LinearSVC

        return make_pipeline(Nystroem(kernel="rbf", gamma=None, n_components=2000, random_state=seed),
                             LinearSVC(C=10.0, max_iter=2000, random_state=seed))
    raise ValueError(f"unknown classifier {kind!r}; valid: {', '.join(CLASSIFIERS)}")


def describe(kind: str, svc: str) -> str:
    return {
        "logistic": "logistic regression (multinomial, lbfgs, C=1)",
        "knn": "kNN (k=5, Euclidean, uniform)",
        "svc": "RBF SVC (C=10, gamma=scale)" if svc == "exact"
        else "RBF SVC stand-in (Nystroem 2000, gamma=scale; linear SVM C=10)",
    }[kind]


def measure(name: str, kinds=CLASSIFIERS, *, svc: str = "nystroem", seed: int = 0, cache: Path | None = None,
            limit: int | None = None) -> dict[str, dict]:
    """{classifier: {"accuracy", "seconds", "settings"}} on the named source's test split, trained on its train split
    (`limit`: the first `limit` training images only, for quick checks). Finished entries in `cache` are reused."""
    results = json.loads(cache.read_text()) if cache is not None and cache.exists() else {}
    todo = [k for k in kinds if _key(k, svc) not in results]
    if todo:
        x_train, y_train = pixels(name, "train")
        x_test, y_test = pixels(name, "test")
        if limit:
            x_train, y_train = x_train[:limit], y_train[:limit]
        if svc == "nystroem":  # gamma "scale" for the approximated kernel, as SVC computes it
            gamma = 1.0 / (x_train.shape[1] * x_train.var())
        for kind in todo:
            model = build(kind, svc=svc, seed=seed)
            if kind == "svc" and svc == "nystroem":
                model.set_params(nystroem__gamma=gamma)
            start = time.perf_counter()
            model.fit(x_train, y_train)
            accuracy = float((model.predict(x_test) == y_test).mean())
            results[_key(kind, svc)] = {"accuracy": accuracy, "seconds": time.perf_counter() - start,
                                        "settings": describe(kind, svc), "train_images": len(x_train)}
            print(f"{describe(kind, svc)}: {accuracy:.4f} ({results[_key(kind, svc)]['seconds']:.0f} s)",
                  file=sys.stderr, flush=True)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                cache.write_text(json.dumps(results, indent=2, sort_keys=True))
    return {k: results[_key(k, svc)] for k in kinds}


def _key(kind: str, svc: str) -> str:
    return f"svc-{svc}" if kind == "svc" else kind


def main(argv: list[str] | None = None) -> int:
    from fastpred.data.named import NAMED_SOURCES

    parser = argparse.ArgumentParser(prog="python -m fastpred.train.pixel_baselines",
                                     description="Raw-pixel baselines of a named data set (scikit-learn).")
    parser.add_argument("--data", default="fashion-mnist", choices=sorted(NAMED_SOURCES))
    parser.add_argument("--only", nargs="+", choices=CLASSIFIERS, default=list(CLASSIFIERS))
    parser.add_argument("--svc", choices=("nystroem", "exact"), default="nystroem")
    parser.add_argument("--limit", type=int, default=None, help="train on the first N training images only")
    parser.add_argument("--cache", type=Path, default=None, help="JSON file of finished results (reused)")
    args = parser.parse_args(argv)
    from fastpred.data.errors import DataError

    try:
        results = measure(args.data, args.only, svc=args.svc, cache=args.cache, limit=args.limit)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for kind, r in results.items():
        print(json.dumps({"data": args.data, "classifier": kind, **r}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
