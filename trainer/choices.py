"""The names and defaults a training option can take, free of torch so that command lines can list
them without loading it; the modules that act on them import them from here."""

from protocol.reference.encoded import TENSOR_DECODERS

AUGMENTATIONS = ("none", "affine", "affine-flip", "crop-flip")
# image files: Pillow threads, or a batched decoder on the device (tensor: the best one)
DECODE_CHOICES = ("auto", "pil", "tensor", *TENSOR_DECODERS)
CACHE_PLACES = ("auto", "cuda", "memory", "mmap")  # where a decoded cache lives
AMP_MODES = ("auto", "bf16", "off")
# the receiver's default student schedule (optimizer steps, images per step); the
# sender's plan trains its confirmed proxies on it too, so that a prediction is of a
# student trained as the device trains
STUDENT_STEPS = 250
STUDENT_BATCH = 128
