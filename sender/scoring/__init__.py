"""Stage 2 of the sender: a teacher trained on the task scores every reference image.

Two paths write the same work directory (:mod:`.work_dir`): in memory, from the
reference images themselves (:mod:`.images`), and streamed from stored CLIP
embeddings (:mod:`.embeddings`). Both take their teachers from :mod:`.teacher_kinds`
and their selection scores from one registry (:mod:`.scores`).
"""
