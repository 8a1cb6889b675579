"""Distributed check for the ResShift-family recipes (HF-Diff here): `accelerate launch --num_processes 2`
on CPU (gloo), batch 2 per process, against one process with batch 4, N steps on tiny random models
(the test fixtures: teacher, SinSR student, VQ-f4, an INN from `onestep-sr train-inn`, a tiny DINOv2).

Noise and data are functions of (seed, step, sample id), so the first step's losses agree to float
round-off; later steps differ by Adam's normalisation of gradient elements that are float noise (conv
biases before a GroupNorm: analytically zero gradient), which moves them by up to lr per step whichever
way the noise falls. The differences therefore scale with lr (measured: lr 1e-3 -> losses 6.6e-4,
weights 5.0e-4 after 3 steps; lr 1e-5 -> 4.8e-7 and 4.9e-6).

    python benchmarks/train_distributed_check_resshift.py [--steps 3] [--lr 1e-5] [--work /tmp/onestep_dist_rs]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import resshift_training_fixtures as rf  # noqa: E402

import training_fixtures as tf  # noqa: E402

KEYS = ("total", "mse", "mse_xT", "mse_gt", "hf", "js")


def _config(work: Path, name: str, batch: int, steps: int, lr: float) -> Path:
    config = rf.config(work, work / name, "hf_diff", steps, hf_inn=str(work / "inn.safetensors"),
                       dino=str(work / "dino"), ema_rate=0.9)
    config["train"].update(batch_size=batch, checkpoint_every=steps)
    config["data"]["flip"] = True
    config["optim"]["lr"] = lr
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--lr", type=float, default=1e-5)
    parser.add_argument("--work", default="/tmp/onestep_dist_rs")
    args = parser.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rf.write_family(work)
    rf.write_inn_with_the_command(work)
    rf.write_dino(work / "dino")
    tf.write_pairs(work / "data", 4, 64)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    runs = {
        "one": [sys.executable, "-m", "onestep_sr.training", str(_config(work, "one", 4, args.steps, args.lr))],
        "two": [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m",
                "onestep_sr.training", str(_config(work, "two", 2, args.steps, args.lr))],
    }
    for name, command in runs.items():
        done = subprocess.run([*command, "--no-progress"], env=env, capture_output=True, text=True)
        if done.returncode:
            print(f"{name} failed:\n{done.stderr[-2000:]}")
            return 1
    rows = {name: list(csv.DictReader((work / name / "log.csv").open())) for name in runs}
    for step, (a, b) in enumerate(zip(rows["one"], rows["two"], strict=True), start=1):
        print(f"step {step}: largest loss difference {max(abs(float(a[k]) - float(b[k])) for k in KEYS):.2e}")
    name = f"checkpoints/step-{args.steps:08d}/HF-Diff.pth"
    one, two = (torch.load(work / run / name, weights_only=True) for run in runs)
    print(f"largest weight difference after {args.steps} steps (lr {args.lr:g}): "
          f"{max((one[k] - two[k]).abs().max().item() for k in one):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
