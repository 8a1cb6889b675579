"""`onestep-sr upscale --ray` on a local Ray (2 CPUs) with the tiny model: the same PNGs as the
single-process CLI, resume after an interruption, and one corrupt input reported while the rest
complete."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

ray = pytest.importorskip("ray")

from onestep_sr.cli import main as cli_main  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(7)
    good, mixed = tmp_path / "good", tmp_path / "mixed"
    good.mkdir(), mixed.mkdir()
    for index in range(4):
        array = rng.integers(0, 256, (16 + 4 * index, 20, 3), dtype=np.uint8)
        Image.fromarray(array).save(good / f"im{index}.png")
        Image.fromarray(array).save(mixed / f"im{index}.png")
    (mixed / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(40))
    return good, mixed, tmp_path


def _upscale(inputs, output, tiny_base_dir, weights, *extra):
    return cli_main(["upscale", str(inputs), "-o", str(output), "--base", str(tiny_base_dir), "--weights",
                     str(weights), "--device", "cpu", "--dtype", "fp32", *extra])


def test_ray_run_equals_single_process_resumes_and_reports_bad_files(local_ray, folders, tiny_base_dir,
                                                                     osediff_pkl, capsys):
    good, mixed, tmp = folders
    weights = osediff_pkl[0]
    import torch

    # Ray's CPU actors run with one thread; the reference run uses one too, since another thread count
    # changes float summation order (about one 8-bit value in 10^4 moves by 1).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert _upscale(good, tmp / "single", tiny_base_dir, weights) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()

    assert _upscale(mixed, tmp / "ray", tiny_base_dir, weights, "--ray") == 1  # one file failed
    captured = capsys.readouterr()
    assert "broken.png" in captured.err and "4 written, 0 skipped, 1 failed" in captured.out
    names = sorted(p.name for p in (tmp / "single").iterdir())
    assert names == [f"im{i}.png" for i in range(4)]
    assert sorted(p.name for p in (tmp / "ray").iterdir()) == names  # nothing for the corrupt input
    for name in names:
        assert (tmp / "ray" / name).read_bytes() == (tmp / "single" / name).read_bytes(), name

    # Interrupted after two files: the others are gone (a killed writer leaves only a hidden .partial).
    for name in names[2:]:
        (tmp / "ray" / name).unlink()
    (tmp / "ray" / ".im3.png.abc.partial").write_bytes(b"half")
    kept = {name: (tmp / "ray" / name).stat() for name in names[:2]}
    assert _upscale(good, tmp / "ray", tiny_base_dir, weights, "--ray") == 0
    out = capsys.readouterr().out
    assert "2 written, 2 skipped, 0 failed" in out
    for name, before in kept.items():  # untouched: same inode and modification time
        after = (tmp / "ray" / name).stat()
        assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    for name in names:
        assert (tmp / "ray" / name).read_bytes() == (tmp / "single" / name).read_bytes(), name


def test_without_ray_installed_the_flag_says_how_to_get_it(monkeypatch, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    assert cli_main(["upscale", str(image), "-o", str(tmp_path / "out"), "--base", "x", "--weights", "y",
                     "--ray"]) == 2
    assert 'pip install "onestep-sr[ray]"' in capsys.readouterr().err


def test_eval_on_ray_equals_local(local_ray, folders, capsys):
    pytest.importorskip("pyiqa")
    import json

    good, _, tmp = folders
    noisy = tmp / "noisy"
    noisy.mkdir()
    rng = np.random.default_rng(1)
    for path in sorted(good.iterdir()):
        array = np.asarray(Image.open(path)).astype(np.int16) + rng.integers(-9, 10, (1,), dtype=np.int16)
        Image.fromarray(np.clip(array, 0, 255).astype(np.uint8)).save(noisy / path.name)
    base = ["eval", "--pred", str(noisy), "--gt", str(good), "--metrics", "psnr", "--json", "--device", "cpu",
            "--weights-dir", str(tmp)]
    assert cli_main(base) == 0
    local = json.loads(capsys.readouterr().out)
    assert cli_main([*base, "--ray"]) == 0
    assert json.loads(capsys.readouterr().out) == local
