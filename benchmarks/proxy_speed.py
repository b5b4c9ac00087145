"""How fast this machine trains one plan proxy: a yardstick for timings taken on shared
machines whose speed drifts.

One confirmation-length proxy run (250 steps of 128, the students' schedule) of the
plan's small CNN on 1,022 random 32x32 RGB images with 10 labels, on one thread, as a
proxy worker trains it; the seconds of each repeat after a warm-up run.

    python -m benchmarks.proxy_speed [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def one_run(images: np.ndarray, labels: np.ndarray) -> float:
    """Seconds of one proxy run on one thread."""
    import torch

    from trainer.choices import STUDENT_BATCH, STUDENT_STEPS
    from trainer.training import StepHooks, TrainConfig, train_classifier

    torch.set_num_threads(1)
    config = TrainConfig(
        min_steps=STUDENT_STEPS,
        max_steps=STUDENT_STEPS,
        batch_size=STUDENT_BATCH,
        label_smoothing=0.1,
    )
    data = (torch.from_numpy(images), torch.from_numpy(labels))
    started = time.perf_counter()
    train_classifier(data, 10, config, in_channels=3, hooks=StepHooks(progress=False))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1022, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, 1022).astype(np.int64)
    one_run(images, labels)  # warm-up
    seconds = [one_run(images, labels) for _ in range(args.repeats)]
    print(
        f"one proxy run (250 steps of 128, one thread): {' '.join(f'{s:.1f}' for s in seconds)} s"
    )


if __name__ == "__main__":
    main()
