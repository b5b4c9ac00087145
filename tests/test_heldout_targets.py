"""The held-out targets' extra measurement images: from the test distribution, never the task's."""

import numpy as np

from benchmarks.heldout_targets import make_target, more_test_images


def image_keys(images: np.ndarray) -> set[bytes]:
    return {image.tobytes() for image in images}


def test_more_test_images_are_fresh_draws_of_the_test_distribution() -> None:
    train, test = make_target("photos-iid")
    more = more_test_images("photos-iid", at_least=1000)
    assert more is not None and len(more) >= 1000
    assert more.class_names == test.class_names
    assert np.bincount(more.labels).min() > 0.9 * np.bincount(more.labels).max()
    assert not image_keys(more.images) & image_keys(np.concatenate([train.images, test.images]))
    again = more_test_images("photos-iid", at_least=1000)
    assert again is not None and np.array_equal(again.images, more.images)


def test_the_shifted_target_draws_its_test_regions_only() -> None:
    more = more_test_images("photos", at_least=600)
    assert more is not None and len(more) >= 600
    draws = [make_target("photos", seed)[1] for seed in (1000, 1001)]
    assert np.array_equal(more.images, np.concatenate([d.images for d in draws]))


def test_a_target_with_no_more_images_says_so() -> None:
    assert more_test_images("digits", at_least=100) is None
