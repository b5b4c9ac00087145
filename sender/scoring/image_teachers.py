"""The image-level teacher: a classifier trained on the task's labeled images.

``cnn`` trains with the shared training loop (:mod:`trainer.training`) and labels
and embeds the reference set with one forward pass. The ``probe`` teacher on
(CLIP) embeddings is :func:`sender.scoring.embedding_teachers.train_probe`, the same for
both scoring paths.
"""

from __future__ import annotations

import numpy as np
import torch

from protocol.task_data import LabeledImages
from sender.scoring.scores import l2_normalize
from sender.scoring.work_dir import TeacherSummary
from trainer.models import SMALL_CNN
from trainer.training import StepHooks, TrainConfig, predict, train_classifier


class CnnTeacher:
    """Image-level teacher; also provides penultimate features as embeddings."""

    kind = "cnn"

    def __init__(self, model_name: str = SMALL_CNN, epochs: int = 40, seed: int = 0) -> None:
        self.model_name = model_name
        self.epochs = epochs
        self.seed = seed
        self.model: torch.nn.Module | None = None

    def fit(self, task: LabeledImages, progress: bool = True) -> TeacherSummary:
        config = TrainConfig(model=self.model_name, epochs=self.epochs, seed=self.seed)
        data = (torch.from_numpy(task.images), torch.from_numpy(task.labels))
        result = train_classifier(
            data,
            len(task.class_names),
            config,
            task.images.shape[1],
            hooks=StepHooks(progress=progress),
        )
        self.model = result.model
        return TeacherSummary(
            kind=self.kind,
            train_images=len(task),
            details={"model": self.model_name, "epochs": self.epochs, "seconds": result.seconds},
        )

    def logits(self, images: np.ndarray, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """(logits, L2-normalised penultimate features) for uint8 images."""
        assert self.model is not None, "fit the teacher first"
        logits, features = predict(
            self.model, torch.from_numpy(images), with_features=True, progress=progress
        )
        assert features is not None
        return logits.numpy(), l2_normalize(features.numpy())
