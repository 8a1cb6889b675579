"""Training one-step SR models (OSEDiff, S3Diff) on the same modules as inference.

Nothing here is imported by the node runtime: the training dependencies (accelerate, peft, kornia,
pyyaml) are the `[train]` extra and are imported only when training runs.
"""
