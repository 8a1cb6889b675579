"""`onestep-sr upscale` as a batch: outputs never overwrite inputs, resume, atomic saves under Ctrl-C,
per-file failures with a summary and exit code, bit depths, and one-line errors.

Most tests swap the model for a nearest-neighbour upscaler (`FakePipeline`): they test the file
handling around the model, which is the same whatever the model computes, and a model load per CLI
call would cost seconds each. One test runs the tiny real model end to end.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from PIL import Image

from onestep_sr.batch import images as images_module
from onestep_sr.batch import upscale_cli
from onestep_sr.cli import main as cli_main
from onestep_sr.pipelines.methods import get_method
from onestep_sr.pipelines.onestep import plan_for_method, resolve_settings

MODEL_ARGS = ["--base", "unused-base", "--weights", "unused.pkl", "--device", "cpu"]


class FakePipeline:
    """Nearest-neighbour x scale (integer scales) with OSEDiff's size rules; records what it ran."""

    def __init__(self):
        self.method = get_method("osediff")
        self.calls: list[tuple[int, ...]] = []

    def resolve(self, settings):
        return resolve_settings(self.method, settings)

    def working_plan(self, height, width, settings):
        return plan_for_method(self.method, height, width, settings)

    def __call__(self, image, settings, hooks):
        self.calls.append(tuple(image.shape))
        scale = int(settings.scale)
        return image.repeat_interleave(scale, 1).repeat_interleave(scale, 2)


@pytest.fixture
def fake(monkeypatch):
    pipeline = FakePipeline()
    loads = []

    def load(*_args):
        loads.append(1)
        return pipeline

    monkeypatch.setattr(upscale_cli, "_load_pipeline", load)
    pipeline.loads = loads
    return pipeline


def _png(path, size=(6, 5), mode="RGB", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "RGB": 3, "RGBA": 4}[mode]
    values = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(values[:, :, 0] if channels == 1 else values).save(path)
    return path


def _upscale(*args: str) -> int:
    return cli_main(["upscale", *args, *MODEL_ARGS])


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def test_outputs_never_overwrite_inputs(tmp_path, fake, capsys):
    photos = tmp_path / "photos"
    originals = {name: _png(photos / name, seed=i).read_bytes() for i, name in enumerate(["a.png", "b.png"])}
    assert _upscale(str(photos), "-o", str(photos)) == 2
    assert "inside the input folder" in capsys.readouterr().err
    assert _upscale(str(photos / "a.png"), "-o", str(photos / "a.png")) == 2
    err = capsys.readouterr().err
    assert "would overwrite the input" in err and "Traceback" not in err and err.count("\n") == 1
    assert {name: (photos / name).read_bytes() for name in originals} == originals
    assert fake.loads == []  # refused before any model loaded


def test_existing_outputs_skip_error_or_overwrite(tmp_path, fake, capsys):
    _png(tmp_path / "in" / "a.png")
    _png(tmp_path / "in" / "b.png")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.png").write_bytes(b"an earlier result")
    assert _upscale(str(tmp_path / "in"), "-o", str(out), "--existing", "error") == 2
    assert "already exist" in capsys.readouterr().err and _files(out) == ["a.png"]
    assert _upscale(str(tmp_path / "in"), "-o", str(out)) == 0  # default: skip
    assert "done 1, skipped 1, failed 0" in capsys.readouterr().err
    assert (out / "a.png").read_bytes() == b"an earlier result" and len(fake.calls) == 1
    assert _upscale(str(tmp_path / "in"), "-o", str(out)) == 0
    assert "done 0, skipped 2" in capsys.readouterr().err and len(fake.calls) == 1 and len(fake.loads) == 1
    assert _upscale(str(tmp_path / "in"), "-o", str(out), "--existing", "overwrite") == 0
    assert Image.open(out / "a.png").size == (24, 20)


def test_same_names_give_separate_outputs_and_subfolders_are_mirrored(tmp_path, fake):
    _png(tmp_path / "one" / "x.png", seed=1)
    _png(tmp_path / "two" / "x.png", seed=2)
    _png(tmp_path / "one" / "photo.png", seed=3)
    Image.open(tmp_path / "one" / "photo.png").save(tmp_path / "one" / "photo.bmp")
    _png(tmp_path / "one" / "deep" / "x.png", seed=4)
    out = tmp_path / "out"
    assert _upscale(str(tmp_path / "one"), str(tmp_path / "two"), "-o", str(out), "--suffix", "_x4") == 0
    assert _files(out) == ["deep/x_x4.png", "photo_bmp_x4.png", "photo_png_x4.png", "x_2_x4.png", "x_x4.png"]
    upscaled_one = np.asarray(Image.open(tmp_path / "one" / "x.png")).repeat(4, 0).repeat(4, 1)
    assert (np.asarray(Image.open(out / "x_x4.png")) == upscaled_one).all()  # input order decides the plain name
    assert not (np.asarray(Image.open(out / "x_2_x4.png")) == upscaled_one).all()


def test_interrupted_save_leaves_nothing_partial_and_a_rerun_resumes(tmp_path, fake, monkeypatch, capsys):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "in" / name, seed=ord(name[0]))
    out = tmp_path / "out"
    out.mkdir()
    (out / "b.png").write_bytes(b"good file from an earlier run")
    real = images_module.atomic_write

    @contextlib.contextmanager
    def interrupted_writer(target, replace=True):
        with real(target, replace) as stream:
            if target.name == "b.png":
                stream.write(b"\x89PNG\r\n\x1a\n half of it")
                raise KeyboardInterrupt
            yield stream

    monkeypatch.setattr(images_module, "atomic_write", interrupted_writer)
    assert _upscale(str(tmp_path / "in"), "-o", str(out), "--existing", "overwrite") == 130
    assert "interrupted" in capsys.readouterr().err
    assert _files(out) == ["a.png", "b.png"]  # no temporary file left, c.png never started
    assert (out / "b.png").read_bytes() == b"good file from an earlier run"
    assert Image.open(out / "a.png").size == (24, 20)

    monkeypatch.setattr(images_module, "atomic_write", real)
    (out / "b.png").unlink()  # say the earlier file was removed: the rerun redoes only b and c
    fake.calls.clear()
    assert _upscale(str(tmp_path / "in"), "-o", str(out)) == 0
    assert len(fake.calls) == 2 and "done 2, skipped 1" in capsys.readouterr().err
    assert _files(out) == ["a.png", "b.png", "c.png"]


def test_bad_files_are_named_and_the_others_still_run(tmp_path, fake, capsys):
    folder = tmp_path / "in"
    _png(folder / "good1.png", seed=1)
    _png(folder / "good2.png", seed=2)
    _png(folder / "huge.png", size=(300, 200))
    (folder / "corrupt.png").write_bytes(b"this is a text file named .png")
    Image.new("RGB", (1200, 1000)).save(folder / "giant.png")  # refused from its header, never decoded
    out = tmp_path / "out"
    assert _upscale(str(folder), "-o", str(out), "--max-pixels", str(700 * 700)) == 1
    err = capsys.readouterr().err
    assert _files(out) == ["good1.png", "good2.png"]
    assert "done 2, skipped 0, failed 3" in err
    assert "corrupt.png" in err and "not an image" in err and "huge.png in" in err and "is 300x200: x4 needs 960000" in err
    assert "giant.png in" in err and "is 1200x1000: x4 needs 19200000 working pixels" in err
    assert "Traceback" not in err

    fake.calls.clear()
    assert _upscale(str(folder), "-o", str(tmp_path / "ff"), "--max-pixels", str(700 * 700), "--fail-fast") == 1
    assert "--fail-fast" in capsys.readouterr().err and fake.calls == [] and not (tmp_path / "ff" / "good1.png").exists()


def test_a_failure_while_computing_does_not_stop_the_batch(tmp_path, fake, monkeypatch, capsys):
    for name in ("a.png", "b.png", "c.png"):
        _png(tmp_path / "in" / name, seed=ord(name[0]))
    real_call = FakePipeline.__call__

    def flaky(self, image, settings, hooks):
        if len(self.calls) == 1:
            self.calls.append(tuple(image.shape))
            raise RuntimeError("simulated failure\nwith a second line")
        return real_call(self, image, settings, hooks)

    monkeypatch.setattr(FakePipeline, "__call__", flaky)
    assert _upscale(str(tmp_path / "in"), "-o", str(tmp_path / "out")) == 1
    err = capsys.readouterr().err
    assert _files(tmp_path / "out") == ["a.png", "c.png"]
    assert "failed: " in err and "b.png: RuntimeError: simulated failure with a second line" in err


def test_16_bit_gray_and_float_tiff_round_trip(tmp_path, fake):
    gray16 = np.random.default_rng(0).integers(0, 65536, (9, 7), dtype=np.uint16)
    (tmp_path / "in").mkdir()
    Image.fromarray(gray16).save(tmp_path / "in" / "g.png")
    floats = np.random.default_rng(1).random((9, 7)).astype(np.float32)
    Image.fromarray(floats).save(tmp_path / "in" / "f.tif")
    out16, out8 = tmp_path / "out16", tmp_path / "out8"
    assert _upscale(str(tmp_path / "in"), "-o", str(out16), "--scale", "1", "--bit-depth", "16") == 0
    assert _upscale(str(tmp_path / "in"), "-o", str(out8), "--scale", "1") == 0
    for source, name in ((gray16 / 65535.0, "g.png"), (floats.astype(np.float64), "f.png")):
        sixteen = Image.open(out16 / name)
        assert sixteen.mode.startswith("I;16")  # still grayscale, still 16 bits
        assert np.abs(np.asarray(sixteen) / 65535.0 - source).max() <= 1 / 65535
        eight = Image.open(out8 / name)
        assert eight.mode == "L" and np.abs(np.asarray(eight) / 255.0 - source).max() <= 1 / 255


def test_formats_that_cannot_hold_the_image(tmp_path, fake, capsys):
    _png(tmp_path / "in" / "rgba.png", mode="RGBA")
    _png(tmp_path / "in" / "rgb.png", mode="RGB")
    assert _upscale(str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--format", "jpg") == 0
    assert _files(tmp_path / "out") == ["rgb.jpg", "rgba.png"]
    assert "cannot be saved as .jpg: written as .png" in capsys.readouterr().err
    assert _upscale(str(tmp_path / "in" / "rgba.png"), "-o", str(tmp_path / "named.jpg")) == 1
    assert "JPEG cannot hold RGBA" in capsys.readouterr().err and not (tmp_path / "named.jpg").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--scale", "inf"], "scale must be a finite number"),
    (["--scale", "nan"], "scale must be a finite number"),
    (["--scale", "-2"], "scale must be positive"),
    (["--latent-overlap", "-8"], "latent overlap must be at least 0"),
    (["--latent-tile", "32", "--latent-overlap", "32"], "must be smaller than the latent tile"),
    (["--tile-batch", "0"], "tile batch must be at least 1"),
    (["--guidance", "nan"], "guidance must be a finite number"),
])
def test_bad_settings_are_refused_in_one_line(tmp_path, fake, capsys, flags, message):
    _png(tmp_path / "a.png")
    assert _upscale(str(tmp_path / "a.png"), "-o", str(tmp_path / "out"), *flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and fake.loads == []


def test_output_path_problems_are_caught_before_loading(tmp_path, fake, capsys):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    (tmp_path / "file").write_text("x")
    assert _upscale(str(tmp_path / "a.png"), str(tmp_path / "b.png"), "-o", str(tmp_path / "file")) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert _upscale(str(tmp_path / "a.png"), "-o", str(tmp_path / "file" / "sub")) == 2
    assert "cannot create the output folder" in capsys.readouterr().err
    assert fake.loads == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_unavailable_device_is_one_line(tmp_path, capsys):
    _png(tmp_path / "a.png")
    assert cli_main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), "--base", "b", "--weights", "w",
                     "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda" in err and "--device cpu" in err and err.count("\n") == 1


def test_debug_shows_the_traceback(tmp_path):
    _png(tmp_path / "a.png")
    with pytest.raises(ValueError, match="scale"):
        cli_main(["--debug", "upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), *MODEL_ARGS,
                  "--scale", "nan"])
    with pytest.raises(ValueError, match="scale"):
        cli_main(["upscale", str(tmp_path / "a.png"), "-o", str(tmp_path / "o"), *MODEL_ARGS, "--scale", "nan",
                  "--debug"])


def test_real_model_batch_with_bad_files(tmp_path, tiny_base_dir, osediff_pkl, capsys):
    """End to end with the tiny model (one good file: each costs a 512 px run): a truncated and a too-large
    file are named, the good one is written and stays grayscale."""
    folder = tmp_path / "in"
    _png(folder / "good.png", size=(10, 12), seed=2, mode="L")
    _png(folder / "huge.png", size=(300, 200))
    (folder / "corrupt.png").write_bytes(_png(tmp_path / "x.png", size=(40, 40)).read_bytes()[:-60])
    out = tmp_path / "out"
    code = cli_main(["upscale", str(folder), "-o", str(out), "--base", str(tiny_base_dir), "--weights",
                     str(osediff_pkl[0]), "--device", "cpu", "--dtype", "fp32", "--max-pixels", str(700 * 700)])
    err = capsys.readouterr().err
    assert code == 1 and _files(out) == ["good.png"]
    assert Image.open(out / "good.png").size == (40, 48) and Image.open(out / "good.png").mode == "L"
    assert "corrupt.png" in err and "corrupt or truncated" in err and "huge.png" in err
    assert "done 1, skipped 0, failed 2" in err


def test_convert_writes_atomically_and_never_over_its_source(tmp_path, osediff_pkl, capsys):
    from onestep_sr.models.weights_io import read_weights_file

    export = tmp_path / "osediff.safetensors"
    assert cli_main(["convert", str(osediff_pkl[0]), str(export)]) == 0
    back = tmp_path / "back.pkl"
    assert cli_main(["convert", str(export), str(back)]) == 0
    original, again = read_weights_file(osediff_pkl[0]), read_weights_file(back)
    assert original.keys() == again.keys()
    assert all(torch.equal(original["state_dict_unet"][k], again["state_dict_unet"][k])
               for k in original["state_dict_unet"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["back.pkl", "osediff.safetensors"]
    before = export.read_bytes()
    assert cli_main(["convert", str(export), str(export)]) == 2
    assert "would overwrite its source" in capsys.readouterr().err and export.read_bytes() == before
