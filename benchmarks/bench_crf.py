#!/usr/bin/env python
"""DenseCRF and soft-voting ensemble timings (prints figures; no asserts).

    python benchmarks/bench_crf.py [--repeats 3] [--noise] [--images 8]

* DenseCRF, one 512x512 image with 11 classes, ``default`` preset (Gaussian 3/3 + bilateral
  49/5/4), at 5 / 10 / 50 mean-field iterations: ``mask2former.postprocess.crf.dense_crf`` and the
  textbook pydensecrf snippet (``unary_from_softmax`` + ``np.array(Q).reshape``), with the time
  split into unary, lattice construction (0 iterations) and per-iteration cost, and the pixel
  accuracy against the known truth. The image is a synthetic trash photo with probabilities of a
  model right on ~80 % of the pixels; ``--noise`` adds a uniform-noise image, the worst case for
  the bilateral lattice (19 s for 50 iterations with the reference setup).
* Soft-voting ensemble streaming: images/s over 3 dumps of ``--images`` 512x512 float16 maps
  (11 classes), vote only and vote + agreement map (page cache warm).
* The whole chain with DenseCRF (2 dumps, 4 images) in 1 and 2 worker processes.

Medians of ``--repeats`` runs, one thread; run on an otherwise idle machine.
"""

import argparse
import statistics
import tempfile
import time

import cv2
import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_softmax

from mask2former.data.masks.rasterize import polygons_to_label_map
from mask2former.data.offline.synthetic import render_synthetic_image
from mask2former.inference.ensemble import SoftVotingEnsemble
from mask2former.inference.pipeline import EnsemblePipeline
from mask2former.inference.prob_dump import ProbDumpWriter
from mask2former.postprocess.crf import CRF_PRESETS, crf_unary, dense_crf

SIZE = 512
NUM_CLASSES = 11


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def model_like_probs(truth, rng, noise_scale=1.2, num_classes=NUM_CLASSES):
    """Probabilities of a model that is right on about 80 % of the pixels: softmax of
    3 * one-hot(truth) + smooth Gaussian noise (blobs of errors, not salt and pepper), stored as
    float16 like a dump and read back as float32."""
    noise = cv2.GaussianBlur(
        rng.normal(size=truth.shape + (num_classes,)).astype(np.float32), (0, 0), 6
    )
    noise /= noise.std()
    logits = (3 * np.eye(num_classes, dtype=np.float32)[truth] + noise_scale * noise).transpose(
        2, 0, 1
    )
    probs = np.exp(logits - logits.max(0))
    probs /= probs.sum(0)
    return probs.astype(np.float16).astype(np.float32)


def textbook_crf(image, probs, iterations):
    """The snippet the competition teams used (pydensecrf's README style)."""
    num_classes, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, num_classes)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=49, srgb=5, rgbim=np.ascontiguousarray(image), compat=4)
    return np.array(crf.inference(iterations)).reshape(num_classes, height, width)


def bench_crf(name, image, probs, truth, repeats):
    preset = CRF_PRESETS["default"]
    unary = median_time(lambda: crf_unary(probs), repeats)
    setup = median_time(lambda: dense_crf(image, probs, preset, 0), repeats)
    print(
        f"\nDenseCRF {name} {SIZE}x{SIZE}, {NUM_CLASSES} classes, preset default (median of "
        f"{repeats}); unary {unary * 1e3:.0f} ms, unary "
        f"+ lattices + copy (0 iterations) {setup:.2f} s"
    )
    print(
        f"{'iterations':>10} | {'dense_crf':>9} | {'textbook':>9} "
        f"| {'per iteration':>13} | pixel accuracy"
    )
    print(
        f"{0:>10} | {setup:>8.2f}s | {'':>9} | {'':>13} | {(probs.argmax(0) == truth).mean():.4f}"
    )
    for iterations in (5, 10, 50):
        ours = median_time(lambda: dense_crf(image, probs, preset, iterations), repeats)
        textbook = median_time(lambda: textbook_crf(image, probs, iterations), repeats)
        accuracy = (dense_crf(image, probs, preset, iterations).argmax(0) == truth).mean()
        per_iteration = (ours - setup) / iterations * 1e3
        print(
            f"{iterations:>10} | {ours:>8.2f}s | {textbook:>8.2f}s | {per_iteration:>10.0f} ms"
            f" | {accuracy:.4f}"
        )


def bench_ensemble(num_images, repeats):
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, NUM_CLASSES, (SIZE // 32, SIZE // 32)).repeat(32, 0).repeat(32, 1)
    base = model_like_probs(blocks, rng)
    with tempfile.TemporaryDirectory() as tmp:
        dumps = []
        for m in range(3):
            with ProbDumpWriter(f"{tmp}/m{m}", [f"c{k}" for k in range(NUM_CLASSES)]) as writer:
                for i in range(num_images):
                    noise = rng.uniform(0, 0.2, base.shape).astype(np.float32)
                    probs = np.roll(base, 7 * i + 3 * m, axis=2) + noise
                    writer.add(f"img{i:03d}.jpg", probs / probs.sum(0))
            dumps.append(f"{tmp}/m{m}")
        ensemble = SoftVotingEnsemble(dumps, [2, 1, 1])
        with_agreement = EnsemblePipeline(ensemble, agreement=True, keep_probs=False)

        def vote():
            for _ in ensemble:
                pass

        def vote_agreement():
            for _ in with_agreement.predictions():
                pass

        vote()  # warm the page cache
        print(
            f"\nsoft-voting ensemble, 3 dumps of {num_images} images {SIZE}x{SIZE} float16, "
            f"{NUM_CLASSES} classes (median of {repeats})"
        )
        for name, fn in (("soft vote", vote), ("soft vote + agreement + argmax", vote_agreement)):
            seconds = median_time(fn, repeats)
            ms = seconds / num_images * 1e3
            print(f"  {name:<32} {num_images / seconds:6.1f} images/s ({ms:.0f} ms/image)")


def bench_workers(num_images, repeats):
    """Vote + DenseCRF (10 iterations) + agreement over 2 dumps, 1 vs 2 worker processes."""
    with tempfile.TemporaryDirectory() as tmp:
        writers = [
            ProbDumpWriter(f"{tmp}/m{m}", [f"c{k}" for k in range(NUM_CLASSES)]) for m in range(2)
        ]
        for i in range(num_images):
            rng = np.random.default_rng(10 + i)
            photo, annotations = render_synthetic_image(SIZE, rng, objects_per_image=(5, 6))
            cv2.imwrite(f"{tmp}/img{i}.png", photo[:, :, ::-1])
            truth = polygons_to_label_map(annotations, SIZE, SIZE)
            for m, writer in enumerate(writers):
                writer.add(
                    f"img{i}.png", model_like_probs(truth, np.random.default_rng(100 * m + i))
                )
        for writer in writers:
            writer.close()
        ensemble = SoftVotingEnsemble([w.out_dir for w in writers])
        pipeline = EnsemblePipeline(
            ensemble,
            crf_params=CRF_PRESETS["default"],
            agreement=True,
            image_root=tmp,
            keep_probs=False,
        )
        print(
            f"\nvote + DenseCRF default x10 + agreement, 2 dumps of {num_images} images "
            f"(median of {repeats})"
        )
        for workers in (1, 2):
            seconds = median_time(lambda: list(pipeline.predictions(workers=workers)), repeats)
            per_image = seconds / num_images
            print(
                f"  workers {workers}: {num_images / seconds:.2f} "
                f"images/s ({per_image:.2f} s/image)"
            )


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--noise", action="store_true", help="also a uniform-noise image (slow: ~2 min)"
    )
    parser.add_argument(
        "--images", type=int, default=8, help="images per dump for the ensemble figure"
    )
    args = parser.parse_args()
    cv2.setNumThreads(1)

    photo, annotations = render_synthetic_image(
        SIZE, np.random.default_rng(1), objects_per_image=(5, 6)
    )
    truth = polygons_to_label_map(annotations, SIZE, SIZE)
    probs = model_like_probs(truth, np.random.default_rng(0))
    bench_crf("synthetic trash photo", np.ascontiguousarray(photo), probs, truth, args.repeats)
    if args.noise:
        noise = np.random.default_rng(2).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        bench_crf("uniform-noise image", noise, probs, truth, args.repeats)
    bench_ensemble(args.images, args.repeats)
    bench_workers(4, args.repeats)


if __name__ == "__main__":
    main()
