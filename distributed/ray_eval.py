"""`onestep-sr eval --ray`: per-image metrics on Ray actors (each builds the metrics once).

Helps on large sets (DIV2K-Val's 3000 pairs x MANIQA's 20 ViT crops): pairs are spread over the
workers; FID still runs once on the driver, folder against folder, since it needs every feature.
The matching, problem reporting and means stay in `evaluation.runner`; this only supplies its
`score_pairs`.
"""

from __future__ import annotations

import json
from pathlib import Path

from .ray_upscale import connect, import_ray


class _MetricWorker:
    def __init__(self, specs, weights_dir: str, device: str, allow_download: bool):
        import torch

        from ..evaluation.runner import PairScorer

        self.scorer = PairScorer(specs, Path(weights_dir), torch.device(device), allow_download)

    def __call__(self, row: dict) -> dict:
        from ..evaluation.pairs import ImagePair

        scored, problem = self.scorer.score(ImagePair(row["name"], Path(row["prediction"]), Path(row["ground_truth"])))
        # JSON text: rows and problems have different keys, which Arrow blocks would not concatenate
        return {"name": row["name"], "row": json.dumps(scored), "problem": json.dumps(problem)}


def ray_pair_scorer(address: str, specs, weights_dir: Path, device, allow_download: bool, workers: int | None):
    """A `score_pairs` for `evaluation.runner.evaluate` that runs on Ray."""
    ray = import_ray()

    def score_pairs(pairs):
        connect(address)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        count = workers or (gpus if gpus else 2)
        dataset = ray.data.from_items([{"name": p.name, "prediction": str(p.prediction),
                                        "ground_truth": str(p.ground_truth)} for p in pairs])
        dataset = dataset.map(_MetricWorker, concurrency=count, num_gpus=1 if gpus else 0,
                              fn_constructor_kwargs={"specs": specs, "weights_dir": str(weights_dir),
                                                     "device": "cuda" if gpus else str(device),
                                                     "allow_download": allow_download})
        for result in dataset.iter_rows():
            yield json.loads(result["row"]), json.loads(result["problem"])

    return score_pairs
