"""plan --deployment: validation images weighted towards the device's own scenery."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.errors import TaskDataError
from protocol.task_data import LabeledImages, load_unlabeled_images
from sender.selection.deployment import (
    MAX_WEIGHT,
    Scenery,
    Validation,
    pixel_features,
    weigh_validation,
)


def _images(rng: np.random.Generator, n: int, brightness: int) -> np.ndarray:
    """Noisy grey squares with a bright or dark left half: two sceneries."""
    images = rng.integers(0, 60, size=(n, 1, 16, 16)).astype(np.int32) + 100
    images[:, :, :, :8] += brightness
    return np.clip(images, 0, 255).astype(np.uint8)


def _labeled(images: np.ndarray) -> LabeledImages:
    labels = np.arange(len(images)) % 2
    return LabeledImages(images, labels, ("a", "b"), "validation")


def _weigh(validation: LabeledImages, deployment: np.ndarray, source: str):
    """The image path's weighting: both sets in pooled pixels."""
    scenery = Scenery(source, pixel_features(deployment), "pixels")
    return weigh_validation(validation, pixel_features(validation.images), scenery, seed=0)


def test_a_validation_set_like_the_deployment_keeps_equal_weights() -> None:
    rng = np.random.default_rng(0)
    validation = _labeled(_images(rng, 200, 0))
    weighted, evidence = _weigh(validation, _images(rng, 200, 0), "same")
    # a classifier no better than chance gives noise, not a density ratio: not applied
    assert evidence.separability_auc < evidence.chance_auc_limit < 0.65
    assert not evidence.applied and np.array_equal(weighted.weights, np.ones(200))
    assert evidence.effective_validation_images == 200


def test_validation_images_that_look_like_the_deployment_weigh_more() -> None:
    rng = np.random.default_rng(1)
    dark, bright = _images(rng, 100, -80), _images(rng, 100, 80)
    validation = _labeled(np.concatenate([dark, bright]))
    weighted, evidence = _weigh(validation, _images(rng, 150, 80), "bright")
    assert evidence.separability_auc > 0.65  # at most 0.75: half the validation is bright
    assert evidence.applied and evidence.separability_auc > evidence.chance_auc_limit
    assert weighted.weights[100:].mean() > 5 * weighted.weights[:100].mean()
    assert weighted.weights.max() <= MAX_WEIGHT * weighted.weights.mean() + 1e-9
    assert evidence.effective_validation_images < 150  # the evidence it costs is reported
    # a student right on the bright images only scores near 100% weighted, 50% unweighted
    right_on_bright = np.where(np.arange(200) < 100, 1 - validation.labels, validation.labels)
    assert Validation.equal(validation).accuracy(right_on_bright) == pytest.approx(0.5)
    assert weighted.accuracy(right_on_bright) > 0.85


def test_the_feature_given_decides_what_tells_the_sets_apart() -> None:
    """The embeddings path weighs in CLIP's feature, not pixels: a shift the pixels do
    not show (the same images) but the feature does is found and weighted towards."""
    rng = np.random.default_rng(2)
    validation = _labeled(_images(rng, 200, 0))
    features = rng.normal(size=(200, 8))
    shifted = rng.normal(size=(200, 8))
    shifted[:, 0] += 1.5
    scenery = Scenery("elsewhere", shifted, "embeddings")
    weighted, evidence = weigh_validation(validation, features, scenery, seed=0)
    assert evidence.applied and evidence.feature == "embeddings"
    toward = features[:, 0] > 0.5  # validation images that lie where the scenery does
    assert weighted.weights[toward].mean() > 2 * weighted.weights[features[:, 0] < -0.5].mean()
    same = Scenery("here", rng.normal(size=(200, 8)), "embeddings")
    assert not weigh_validation(validation, features, same, seed=0)[1].applied


def test_effective_images_is_kish() -> None:
    images = _labeled(np.zeros((4, 1, 2, 2), np.uint8))
    assert Validation.equal(images).effective_images == pytest.approx(4.0)
    assert Validation(images, np.array([2.0, 2.0, 0.0, 0.0])).effective_images == pytest.approx(2)


def test_unlabeled_images_load_from_a_folder_at_any_depth_or_a_npz(tmp_path) -> None:
    from PIL import Image

    (tmp_path / "scenery" / "day").mkdir(parents=True)
    Image.new("RGB", (40, 30), (200, 10, 10)).save(tmp_path / "scenery" / "a.png")
    Image.new("RGB", (20, 20), (0, 0, 255)).save(tmp_path / "scenery" / "day" / "b.jpg")
    (tmp_path / "scenery" / "day" / "broken.jpg").write_bytes(b"not an image")
    loaded = load_unlabeled_images(tmp_path / "scenery", 8, 1)
    assert loaded.shape == (2, 1, 8, 8) and loaded.dtype == np.uint8
    np.savez(tmp_path / "s.npz", images=np.zeros((3, 8, 8), np.uint8))
    assert load_unlabeled_images(tmp_path / "s.npz", 8, 1).shape == (3, 1, 8, 8)
    with pytest.raises(TaskDataError, match="the task's are uint8"):
        load_unlabeled_images(tmp_path / "s.npz", 16, 1)
    np.savez(tmp_path / "none.npz", images=np.zeros((0, 8, 8), np.uint8))
    with pytest.raises(TaskDataError, match="holds no images"):
        load_unlabeled_images(tmp_path / "none.npz", 8, 1)
    np.savez(tmp_path / "flat.npz", images=np.zeros(5, np.uint8))
    with pytest.raises(TaskDataError, match="convert them"):
        load_unlabeled_images(tmp_path / "flat.npz")
    np.save(tmp_path / "single.npy", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(TaskDataError, match=r"not a \.npz with an images array"):
        load_unlabeled_images(tmp_path / "single.npy", 8, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(TaskDataError, match="no images found"):
        load_unlabeled_images(tmp_path / "empty", 8, 1)
    with pytest.raises(TaskDataError, match="does not exist"):
        load_unlabeled_images(tmp_path / "absent", 8, 1)
