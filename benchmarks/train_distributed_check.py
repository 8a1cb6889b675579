"""Distributed check: `accelerate launch --num_processes 2` on CPU (gloo), batch 2 per process, against
one process with batch 4, N steps of OSEDiff (or, with --method s3diff, S3Diff) training on the tiny
SD-2-shaped base.

Data and noise are functions of (seed, step, global sample position) (training/data.py, osediff.py), the
losses are per-process means and DDP averages gradients, so both runs should end with the same weights
up to float summation order. Paired LR/HR data is used because the online degradation draws its
per-batch choices (resize scale/mode) per process batch.

    python benchmarks/train_distributed_check.py [--steps 3] [--work /tmp/onestep_dist]

Prints the largest loss difference (logged per step) and the largest absolute difference between the two
runs' trainable weights (every optimiser's), and exits 1 when the weights differ by more than --tolerance (1e-4). Adam divides
each gradient element by its own magnitude, so in the first steps elements whose gradient is float noise
move by a noticeable fraction of lr whichever way the noise falls: the weights agree to ~1e-5 with lr 1e-3,
the losses to ~1e-7.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import tinymodels  # noqa: E402
import training_fixtures as tf  # noqa: E402


def _config(work: Path, name: str, batch: int, steps: int, hr: Path, lr: Path, method: str,
            learning_rate: float | None) -> Path:
    config = tf.tiny_config(work / name, work / "base", work / "features", hr, train__max_steps=steps,
                            train__batch_size=batch, train__checkpoint_every=steps)
    config["data"].update({"train_lr": str(lr), "flip": True})
    if method == "s3diff":  # tests/test_training_s3diff.py's tiny setup: ranks 4, DINO width 32, de_net
        config["method"] = "s3diff"
        config["model"].update({"de_net": str(work / "features" / "de_net.pth"), "rank_unet": 4, "rank_vae": 4})
        config["loss"] = {"mse": 2.0, "lpips": 5.0, "gan": 0.5, "vsd": 0.0, "negative_sample_prob": 0.25,
                          "positive_prompt": "a photo"}
    if learning_rate is not None:
        config.setdefault("optim", {})["lr"] = learning_rate
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--work", default="/tmp/onestep_dist")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--method", choices=["osediff", "s3diff"], default="osediff")
    parser.add_argument("--lr", type=float, default=None,
                        help="override optim.lr (Adam's noise-driven weight differences scale with it)")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    base = tinymodels.build_tiny_base(0, work / "tokenizer")
    tinymodels.save_diffusers_folder(base, work / "base")
    tf.write_feature_networks(work / "features")
    if args.method == "s3diff":
        from onestep_sr.training.losses.dino_discriminator import DinoViT

        import synthetic_s3diff

        torch.manual_seed(0)
        torch.save(DinoViT(dim=32, depth=12, heads=1).state_dict(), work / "features" / "dino_vitbase16_pretrain.pth")
        synthetic_s3diff.write_de_net(work / "features" / "de_net.pth")
    hr, lr = tf.write_pairs(work / "pairs", 6, size=64)
    single = _config(work, "single", 4, args.steps, hr, lr, args.method, args.lr)
    double = _config(work, "double", 2, args.steps, hr, lr, args.method, args.lr)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "onestep_sr.training", str(single), "--no-progress"], check=True, env=env)
    # accelerate's `--cpu` launches ONE process; the torchrun launcher (--multi_gpu) starts two, and the
    # config's train.device: cpu makes accelerate use gloo on the CPU (DistributedType.MULTI_CPU).
    subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                    "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                    "-m", "onestep_sr.training", str(double), "--no-progress"], check=True, env=env)
    name = f"step-{args.steps:08d}"
    states = [torch.load(work / n / "run" / "checkpoints" / name / "training_state.pt", weights_only=False)
              for n in ("single", "double")]
    worst, changed = 0.0, 0.0
    for key, value in states[0]["trainable"].items():  # every phase's weights (generator, fake / discriminator)
        worst = max(worst, float((value - states[1]["trainable"][key]).abs().max()))
        changed = max(changed, float(value.abs().max()))
    start = states[0]
    import csv

    logs = [list(csv.DictReader((work / n / "run" / "log.csv").open())) for n in ("single", "double")]
    loss_diff = max(abs(float(r1[k]) - float(r2[k])) for r1, r2 in zip(*logs, strict=True)
                    for k in r1 if k not in ("step", "lr", "steps_per_s"))
    print(f"max |loss difference| over {args.steps} steps = {loss_diff:.3e}")
    print(f"{args.steps} steps, 1 process x batch 4 vs 2 processes x batch 2 (gloo): "
          f"max |weight difference| = {worst:.3e} (largest weight {changed:.3e}); step {start['step']}")
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
