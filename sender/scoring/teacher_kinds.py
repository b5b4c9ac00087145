"""The teachers a task can be scored with, by name.

Kept free of torch so that the command line can list them without loading it.
"""

IMAGE_TEACHERS = ("cnn", "probe")  # score --reference: trained on the task's images
EMBEDDING_TEACHERS = ("probe", "zeroshot", "knn")  # score --embeddings: on stored CLIP rows
TEACHERS = tuple(dict.fromkeys(IMAGE_TEACHERS + EMBEDDING_TEACHERS))
