"""Batch upscaling that never loses a file: planning, atomic writes, image files, the run report.

Importable pieces (each module's docstring has the details):
- `batch.plan`: `list_inputs`, `plan_outputs` -> `OutputPlan` of `PlannedOutput` (mirrored
  sub-folders, collision-free names, outputs never overwrite inputs, `existing` skip|overwrite|error).
- `batch.atomic`: `atomic_write` (temp file in the target folder, fsync, rename; nothing partial on
  any exception, KeyboardInterrupt included), `write_bytes_atomic`, `is_partial_file`.
- `batch.images`: `probe_image`, `read_image` / `load_image` (every Pillow mode), `save_image`
  (8 or 16 bits, atomic), `output_format` / `fallback_suffix`, `ImageError`.
- `batch.runner`: the CLI's batch loop (pre-validation, per-file errors, summary, exit code).
"""
