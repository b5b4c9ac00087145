"""The teachers a task can be scored with, by name, and the scoring paths each runs on.

- ``images``: ``plada-send score --reference SPEC --train T`` (in memory, from the
  reference images themselves: :mod:`sender.scoring.images`);
- ``embeddings``: ``plada-send score --embeddings EMB`` (streamed from stored CLIP
  embeddings: :mod:`sender.scoring.embeddings`).

Kept free of torch so that the command line can list them without loading it.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.errors import ConfigError

IMAGES = "images"
EMBEDDINGS = "embeddings"


@dataclass(frozen=True)
class TeacherKind:
    """A teacher, and the scoring paths it runs on."""

    name: str
    paths: tuple[str, ...]
    summary: str


TEACHERS: dict[str, TeacherKind] = {
    kind.name: kind
    for kind in (
        TeacherKind("cnn", (IMAGES,), "a small CNN trained on the task's images"),
        TeacherKind("probe", (IMAGES, EMBEDDINGS), "a linear probe on CLIP embeddings"),
        TeacherKind("zeroshot", (EMBEDDINGS,), "CLIP's text tower on the class names"),
        TeacherKind("knn", (EMBEDDINGS,), "the nearest labeled task images of each class"),
    )
}
DEFAULT_TEACHER = {IMAGES: "cnn", EMBEDDINGS: "probe"}


def teachers_on(path: str) -> tuple[str, ...]:
    """The teachers of one scoring path, by name."""
    return tuple(name for name, kind in TEACHERS.items() if path in kind.paths)


def teacher_for(name: str | None, path: str) -> str:
    """The teacher ``--teacher`` names (None: the path's default), checked against the
    path; a ``ConfigError`` naming the fix otherwise."""
    name = name or DEFAULT_TEACHER[path]
    kind = TEACHERS.get(name)
    if kind is None:
        raise ConfigError(f"unknown teacher {name!r} ({', '.join(teachers_on(path))})")
    if path not in kind.paths:
        if path == EMBEDDINGS:
            raise ConfigError(f"the {name} teacher works on images: drop --embeddings")
        raise ConfigError(f"--teacher {name} needs --embeddings (see 'plada-send embed')")
    return name
