"""What augmentation costs in a fine-tuning step: Keras' preprocessing layers against tlcli's one resampling.

    .venv/bin/python bench/bench_augment.py [--batch 32] [--size 320] [--reps 5]

On one batch of random pixels at the default recipe's input (a batch of photos is two views each, so
2 x ``--batch`` images), times, in turn each round, median of ``--reps``:
  Keras layers     RandomFlip + RandomZoom + RandomRotation, as fine-tuning chained them before;
  tlcli, rotate    tlcli's Augment with flip,zoom,rotate (the default): one projective resampling;
  tlcli, no rotate tlcli's Augment with flip,zoom: one crop_and_resize;
  training step    forward and backward of MobileNet v1 0.25 (every layer trainable, weights none) and
                   its head on the same images, Adam: what the augmentation sits beside in an epoch.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=320)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    import keras
    import numpy as np
    import tensorflow as tf

    from tlcli.train.augment import Augment

    n = 2 * args.batch
    x = tf.constant(np.random.default_rng(0).uniform(0, 255, (n, args.size, args.size, 3)).astype("float32"))
    y = tf.constant(np.arange(n) % 2)
    layers = keras.layers
    chain = keras.Sequential(
        [layers.RandomFlip("horizontal"), layers.RandomZoom((-0.15, 0.0)), layers.RandomRotation(0.05)]
    )
    rotate, crop = Augment(("flip", "zoom", "rotate"), 0), Augment(("flip", "zoom"), 0)
    backbone = keras.applications.MobileNet(
        alpha=0.25, weights=None, include_top=False, pooling="avg", input_shape=(args.size, args.size, 3)
    )
    model = keras.Sequential([backbone, keras.layers.Dense(2, activation="softmax")])
    optimizer = keras.optimizers.Adam(1e-4)
    loss = keras.losses.SparseCategoricalCrossentropy()

    @tf.function
    def step(images, labels):
        with tf.GradientTape() as tape:
            value = loss(labels, model(images, training=True))
        grads = tape.gradient(value, model.trainable_variables)
        optimizer.apply_gradients(zip(grads, model.trainable_variables, strict=True))
        return value

    ways = {
        "Keras layers (flip, zoom, rotate)": tf.function(lambda v: chain(v, training=True)),
        "tlcli flip,zoom,rotate (one projective resampling)": tf.function(lambda v: rotate(v)),
        "tlcli flip,zoom (one crop_and_resize)": tf.function(lambda v: crop(v)),
        "training step (MobileNet 0.25, every layer)": lambda v: step(v, y),
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for _ in range(args.reps + 1):
        for name, run in ways.items():
            start = time.perf_counter()
            np.asarray(run(x))
            times[name].append(time.perf_counter() - start)
    median = {k: sorted(v[1:])[args.reps // 2] for k, v in times.items()}
    train = median["training step (MobileNet 0.25, every layer)"]
    print(f"{n} images of {args.size} px a batch, load average {os.getloadavg()[0]:.1f}")
    print("| what | seconds a batch | vs the training step |")
    print("| --- | --- | --- |")
    for name, seconds in median.items():
        print(f"| {name} | {seconds:.3f} | {seconds / train:.2f}x |")


if __name__ == "__main__":
    main()
