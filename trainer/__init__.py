"""The training loop both sides use: batch sources, models, checkpoints and crash points.

The sender trains its teacher with it and the receiver its student; neither side
imports the other, both import this package and :mod:`protocol`.
"""
