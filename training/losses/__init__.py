"""Training objectives as plain torch modules and functions, one idea per module.

Nothing here depends on a trainer: each loss takes tensors (and, where it needs one, a frozen
feature network or a diffusion schedule) and returns tensors, so any training loop can call it.
See docs/training.md for the formula, source and every open choice of each objective.
"""
