"""Stage 1 of the sender: the reference set embedded once (CLIP), stored in resumable
parts, merged, and indexed with FAISS.

- :mod:`.embedders`: open_clip loaded from local weights, and the pixel embedder;
- :mod:`.engine`: what every embedding engine shares (the plan of parts and batches,
  the part collector, the summary);
- :mod:`.local` and :mod:`.ray_engine`: the two engines (this process, a Ray actor pool);
- :mod:`.tensor_decode`: batched decoding on the embedding device;
- :mod:`.store`: the embeddings directory (parts, merged file, manifest) and its merge;
- :mod:`.index`: the FAISS index over stored embeddings.
"""
