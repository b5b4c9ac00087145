"""How fast this machine trains one plan proxy: a yardstick for timings taken on shared
machines whose speed drifts.

One confirmation-length proxy run (250 steps of 128, the students' schedule), trained
and scored as the plan does (``sender.selection.plan.proxy_accuracy`` on one thread),
on 1,022 random 32x32 RGB images with 10 labels, scored on 223 validation images; the
seconds of each repeat after a warm-up run.

    python -m benchmarks.proxy_speed [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def main() -> None:
    from protocol.task_data import LabeledImages
    from sender.selection.deployment import Validation
    from sender.selection.plan import ProxyRun, proxy_accuracy
    from sender.selection.proxy_pool import one_thread
    from trainer.choices import STUDENT_BATCH, STUDENT_STEPS

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1022 + 223, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, images.shape[0]).astype(np.int64)
    names = tuple(str(c) for c in range(10))
    validation = Validation.equal(LabeledImages(images[1022:], labels[1022:], names))
    run = ProxyRun(STUDENT_STEPS, STUDENT_BATCH, seed=0)

    def one_run() -> float:
        started = time.perf_counter()
        one_thread(proxy_accuracy, images[:1022], labels[:1022], validation, run)
        return time.perf_counter() - started

    one_run()  # warm-up
    seconds = " ".join(f"{one_run():.1f}" for _ in range(args.repeats))
    print(f"one proxy run (250 steps of 128, one thread): {seconds} s")


if __name__ == "__main__":
    main()
