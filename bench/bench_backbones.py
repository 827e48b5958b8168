"""Which backbone the configs name for users: published ImageNet accuracy against CPU cost measured here.

    .venv/bin/python bench/bench_backbones.py [--batch 32] [--reps 3]

Only MobileNet v1 0.25's ImageNet weights are offline, so the cost of every candidate is measured with
``weights=None`` (the same graph, the same arithmetic): the network alone, tlcli's traced feature graph at
the size extract uses for it, on one batch of random pixels, the candidates in turn each round, median of
``--reps`` rounds. Accuracy is the published ImageNet top-1 (Keras Applications' table; MobileNetV3 from its
Keras docstring; MobileNet v1 0.25 from its paper, Howard et al. 2017); fixed-feature transfer accuracy
follows it closely (Kornblith et al. 2019, "Do Better ImageNet Models Transfer Better?").
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

CANDIDATES = {  # (backbone, alpha): published ImageNet top-1
    ("mobilenet", 0.25): 50.6,
    ("mobilenetv2", None): 71.3,
    ("mobilenetv3large", None): 75.6,
    ("resnet50", None): 74.9,
    ("efficientnetb0", None): 77.1,
    ("efficientnetv2b0", None): 78.7,
    ("efficientnetv2b1", None): 79.8,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()

    import numpy as np

    from tlcli.models import backbones, graph
    from tlcli.models.portable import features_model
    from tlcli.train.recipes import input_size

    nets = {}
    for (name, alpha), _ in CANDIDATES.items():
        sp = backbones.spec(name)
        size = input_size(sp.name, alpha, None, sp.size)[0]
        model = features_model(backbones.build(name, alpha, size, "none"), 1, False)
        pixels = np.random.default_rng(0).integers(0, 256, (args.batch, size, size, 3), dtype=np.uint8)
        nets[name, alpha] = (size, graph.inference_function(model, (size, size, 3)), pixels)
    times: dict[tuple, list[float]] = {k: [] for k in nets}
    for _ in range(args.reps + 1):
        for key, (_, run, pixels) in nets.items():
            start = time.perf_counter()
            np.asarray(run(pixels))
            times[key].append(time.perf_counter() - start)
    load = os.getloadavg()[0]
    print(f"| backbone | input | ImageNet top-1 (published) | images/s here (2 cores, load {load:.1f}) | ms an image |")
    print("| --- | --- | --- | --- | --- |")
    for (name, alpha), top1 in CANDIDATES.items():
        seconds = sorted(times[name, alpha][1:])[args.reps // 2]
        label = f"{name} {alpha:g}" if alpha else name
        size = nets[name, alpha][0]
        print(f"| {label} | {size} | {top1:.1f}% | {args.batch / seconds:.0f} | {1000 * seconds / args.batch:.1f} |")


if __name__ == "__main__":
    main()
