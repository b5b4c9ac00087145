"""Teachers: models trained on the task's labeled images that label the reference set.

- ``cnn``: an image classifier trained with the receiver's own training loop;
- ``probe``: multinomial logistic regression on (CLIP) embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from protocol.task_data import LabeledImages

TEACHERS = ("cnn", "probe")


@dataclass
class TeacherReport:
    """What the teacher is and how well it does on the task's own test split."""

    kind: str
    train_images: int
    test_accuracy: float | None = None
    details: dict[str, object] = field(default_factory=dict)


class CnnTeacher:
    """Image-level teacher; also provides penultimate features as embeddings."""

    kind = "cnn"

    def __init__(self, model_name: str = "small-cnn", epochs: int = 40, seed: int = 0) -> None:
        self.model_name = model_name
        self.epochs = epochs
        self.seed = seed
        self.model: torch.nn.Module | None = None

    def fit(self, task: LabeledImages, progress: bool = True) -> TeacherReport:
        from receiver.training import TrainConfig, train_classifier

        config = TrainConfig(model=self.model_name, epochs=self.epochs, seed=self.seed)
        data = (torch.from_numpy(task.images), torch.from_numpy(task.labels))
        result = train_classifier(
            data, len(task.class_names), config, task.images.shape[1], progress=progress
        )
        self.model = result.model
        return TeacherReport(
            kind=self.kind,
            train_images=len(task),
            details={"model": self.model_name, "epochs": self.epochs, "seconds": result.seconds},
        )

    def logits(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits, L2-normalised penultimate features) for uint8 images."""
        from receiver.training import predict
        from sender.scoring import l2_normalize

        assert self.model is not None, "fit the teacher first"
        logits, features = predict(self.model, torch.from_numpy(images), with_features=True)
        assert features is not None
        return logits.numpy(), l2_normalize(features.numpy())


class ProbeTeacher:
    """Linear probe (logistic regression) on L2-normalised embeddings."""

    kind = "probe"

    def __init__(self, c: float = 10.0, seed: int = 0) -> None:
        from sklearn.linear_model import LogisticRegression

        self.classifier = LogisticRegression(C=c, max_iter=2000, random_state=seed)

    def fit(self, embeddings: np.ndarray, labels: np.ndarray) -> TeacherReport:
        self.classifier.fit(embeddings, labels)
        return TeacherReport(kind=self.kind, train_images=int(labels.size))

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        return self.classifier.decision_function(embeddings).astype(np.float32)
