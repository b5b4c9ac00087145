"""The device's own scenery: the plan's validation images weighted by how much they
resemble unlabeled images from where the device will work (``plan --deployment``).

The labeled images a task comes with are often not where the device works (other
regions, light, sensors). Given unlabeled images of the deployment, the plan scores each
candidate by a weighted validation accuracy, each validation image weighted by the
density ratio p_deploy(x) / p_validation(x), estimated as the odds of a classifier that
tells the two sets apart (a logistic regression, cross-fitted so no image is weighted by
a model that saw it), in a feature the teacher did not shape: on the image path the
images' own pixels, mean-centred and pooled to 16 x 16 (:func:`pixel_features`); on the
embeddings path the CLIP embeddings the store was made with (the probe teacher is fit on
them and does not change them), which tell apart regions and light that pooled pixels
average away. Weights are capped at :data:`MAX_WEIGHT` times their mean, so a handful of
validation images never decide the plan alone; what they cost in evidence is reported as
the effective number of validation images (Kish), which also sets the plan's noise floor.

A classifier that tells the sets apart no better than chance gives odds that are noise,
not a density ratio: weights are applied only when its cross-fitted AUC exceeds 0.5 by
more than :data:`SIGNIFICANCE` standard errors of the AUC of two sets of these sizes
drawn alike (Mann-Whitney); otherwise every weight stays 1 and the evidence says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from protocol.task_data import LabeledImages

MAX_WEIGHT = 10.0  # times the mean weight
FOLDS = 5
SIGNIFICANCE = 3.0  # standard errors of a chance AUC


@dataclass(frozen=True)
class Validation:
    """The images the plan's proxies are scored on, and each one's weight (mean 1)."""

    images: LabeledImages
    weights: np.ndarray  # float64 [N]

    @classmethod
    def equal(cls, images: LabeledImages) -> Validation:
        return cls(images, np.ones(len(images)))

    @property
    def effective_images(self) -> float:
        """Kish's effective sample size: N for equal weights, fewer the more unequal."""
        return float(self.weights.sum() ** 2 / np.square(self.weights).sum())

    def accuracy(self, predicted: np.ndarray) -> float:
        """Weighted share of the images whose label is ``predicted``."""
        correct = predicted == self.images.labels
        return float(np.dot(correct, self.weights) / self.weights.sum())

    def accuracy_within(self, classes: np.ndarray) -> float:
        """The most a classifier that predicts only ``classes`` can score: the weighted
        share of the images whose label is one of them."""
        return self.accuracy(np.where(np.isin(self.images.labels, classes), self.images.labels, -1))


@dataclass(frozen=True)
class Scenery:
    """Unlabeled images of where the device will work, as features (``feature`` names them)."""

    source: str
    features: np.ndarray  # [N, d]
    feature: str  # "pixels" or "CLIP embeddings"


def pixel_features(images: np.ndarray) -> np.ndarray:
    """The image path's feature: uint8 [N, C, S, S] mean-centred and pooled to 16 x 16."""
    from sender.embedding.embedders import PixelEmbedder

    return PixelEmbedder().embed(images)


@dataclass(frozen=True)
class DeploymentEvidence:
    """How the deployment images reweighted the validation images, for plan.json."""

    source: str
    deployment_images: int
    validation_images: int
    separability_auc: float  # 0.5: the two sets look alike; 1.0: told apart every time
    chance_auc_limit: float  # the AUC above which the sets differ beyond chance
    applied: bool  # False: alike as far as the feature tells, every weight 1
    effective_validation_images: float
    max_weight: float
    feature: str = "pixels"  # what told the sets apart (plans before it was named: pixels)


def weigh_validation(
    validation: LabeledImages, features: np.ndarray, scenery: Scenery, seed: int
) -> tuple[Validation, DeploymentEvidence]:
    """``validation`` (whose images are ``features``, in the scenery's feature) weighted
    towards the ``scenery``."""
    deployment = scenery.features
    both = np.concatenate([features, deployment]).astype(np.float64)
    is_deployment = np.r_[np.zeros(len(validation)), np.ones(len(deployment))]
    odds, auc = _cross_fitted_odds(both, is_deployment, seed)
    limit = 0.5 + SIGNIFICANCE * _chance_auc_sd(len(validation), len(deployment))
    weights = np.ones(len(validation))
    if auc > limit:
        weights = odds[: len(validation)] / odds[: len(validation)].mean()
        weights = np.minimum(weights, MAX_WEIGHT)
        weights = weights / weights.mean()
    weighted = Validation(validation, weights)
    evidence = DeploymentEvidence(
        source=scenery.source,
        deployment_images=len(deployment),
        validation_images=len(validation),
        separability_auc=round(auc, 4),
        chance_auc_limit=round(limit, 4),
        applied=bool(auc > limit),
        effective_validation_images=round(weighted.effective_images, 1),
        max_weight=round(float(weights.max()), 3),
        feature=scenery.feature,
    )
    return weighted, evidence


def _chance_auc_sd(first: int, second: int) -> float:
    """The standard deviation of the AUC between two sets of these sizes drawn from one
    distribution (the Mann-Whitney statistic under its null)."""
    return float(np.sqrt((first + second + 1) / (12.0 * max(1, first * second))))


def _cross_fitted_odds(
    features: np.ndarray, is_deployment: np.ndarray, seed: int
) -> tuple[np.ndarray, float]:
    """(each image's odds of being a deployment image, from a classifier fit without it;
    the area under the ROC curve of those predictions). Classes are balanced, so the odds
    are the density ratio up to a constant."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold

    folds = min(FOLDS, int(min(is_deployment.sum(), (1 - is_deployment).sum())))
    if folds < 2:
        return np.ones(len(features)), 0.5
    probability = np.empty(len(features))
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    for fit, held in split.split(features, is_deployment):
        model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
        model.fit(features[fit], is_deployment[fit])
        probability[held] = model.predict_proba(features[held])[:, 1]
    probability = np.clip(probability, 1e-6, 1 - 1e-6)
    return probability / (1 - probability), float(roc_auc_score(is_deployment, probability))
