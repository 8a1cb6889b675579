"""batch.plan, batch.atomic, batch.images: output planning, atomic writes and image files (no models)."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from onestep_sr.batch import atomic
from onestep_sr.batch.atomic import atomic_write, is_partial_file, remove_stale_partials, write_bytes_atomic
from onestep_sr.batch.images import (
    ImageError,
    fallback_suffix,
    load_image,
    output_format,
    probe_image,
    read_image,
    save_image,
)
from onestep_sr.batch.plan import PlanError, list_inputs, plan_outputs


def _png(path, size=(6, 5), mode="RGB", seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"L": 1, "LA": 2, "RGB": 3, "RGBA": 4}[mode]
    values = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(values[:, :, 0] if channels == 1 else values).save(path)
    return path


def _decode_png16(data: bytes) -> np.ndarray:
    """Independent reader for the filter-0, non-interlaced 16-bit PNGs our writer produces."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0] == zlib.crc32(kind + body)
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, color_type = header[:4]
    channels = {0: 1, 4: 2, 2: 3, 6: 4}[color_type]
    assert depth == 16
    rows = np.frombuffer(zlib.decompress(idat), dtype=np.uint8).reshape(height, -1)
    assert (rows[:, 0] == 0).all()
    return rows[:, 1:].copy().view(">u2").reshape(height, width, channels).astype(np.int64)


# -- planning ------------------------------------------------------------------------------------------

def test_mirrors_subfolders_and_disambiguates_equal_names(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    _png(a / "x.png")
    _png(b / "x.png")
    _png(a / "photo.png")
    Image.open(a / "photo.png").convert("RGB").save(a / "photo.jpg")
    _png(a / "sub" / "deep.png")
    _png(a / ".hidden.png")
    (a / ".x.png.abc.partial").write_bytes(b"leftover")
    plan = plan_outputs(list_inputs([a, b]), tmp_path / "out", suffix="_x4")
    names = sorted(str(item.target.relative_to(tmp_path / "out")) for item in plan.items)
    assert names == ["photo_jpg_x4.png", "photo_png_x4.png", "sub/deep_x4.png", "x_2_x4.png", "x_x4.png"]
    assert len({item.target for item in plan.items}) == 5
    assert all(not item.skip for item in plan.items)


def test_names_never_collide_case_insensitively_or_with_a_tagged_name(tmp_path):
    _png(tmp_path / "in" / "A.png")
    _png(tmp_path / "in" / "a.PNG")
    _png(tmp_path / "in2" / "a_2.png")
    plan = plan_outputs(list_inputs([tmp_path / "in", tmp_path / "in2"]), tmp_path / "out")
    keys = [str(item.target).casefold() for item in plan.items]
    assert len(set(keys)) == 3


def test_rerun_plans_the_same_names(tmp_path):
    for folder in ("a", "b"):
        _png(tmp_path / folder / "x.png")
    first = [i.target for i in plan_outputs(list_inputs([tmp_path / "a", tmp_path / "b"]), tmp_path / "o").items]
    second = [i.target for i in plan_outputs(list_inputs([tmp_path / "a", tmp_path / "b"]), tmp_path / "o").items]
    assert first == second


def test_refuses_outputs_that_would_overwrite_inputs(tmp_path):
    photos = tmp_path / "photos"
    original = _png(photos / "in.png").read_bytes()
    with pytest.raises(PlanError, match="inside the input folder"):
        plan_outputs(list_inputs([photos]), photos)
    with pytest.raises(PlanError, match="inside the input folder"):
        plan_outputs(list_inputs([photos]), photos / "up")
    with pytest.raises(PlanError, match="would overwrite the input"):
        plan_outputs(list_inputs([photos / "in.png"]), photos / "in.png")
    with pytest.raises(PlanError, match="would overwrite the input"):
        plan_outputs(list_inputs([photos / "in.png"]), photos)  # folder output, same name
    assert (photos / "in.png").read_bytes() == original
    plan = plan_outputs(list_inputs([photos / "in.png"]), photos, suffix="_x4")  # a different name is fine
    assert plan.items[0].target == photos / "in_x4.png"


def test_existing_outputs_follow_the_policy(tmp_path):
    _png(tmp_path / "in" / "a.png")
    _png(tmp_path / "in" / "b.png")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.png").write_bytes(b"done before")
    inputs = list_inputs([tmp_path / "in"])
    plan = plan_outputs(inputs, tmp_path / "out")
    assert [i.target.name for i in plan.skipped] == ["a.png"] and [i.target.name for i in plan.todo] == ["b.png"]
    plan = plan_outputs(inputs, tmp_path / "out", existing="overwrite")
    assert len(plan.todo) == 2 and plan.items[0].exists
    with pytest.raises(PlanError, match=r"1 output\(s\) already exist.*a\.png.*--existing"):
        plan_outputs(inputs, tmp_path / "out", existing="error")
    with pytest.raises(PlanError, match="policy"):
        plan_outputs(inputs, tmp_path / "out", existing="maybe")


def test_output_path_errors(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    inputs = list_inputs([tmp_path / "a.png", tmp_path / "b.png"])
    with pytest.raises(PlanError, match="names a file but there are 2 inputs"):
        plan_outputs(inputs, tmp_path / "out.png")
    (tmp_path / "file").write_text("x")
    with pytest.raises(PlanError, match="is a file, not a folder"):
        plan_outputs(inputs, tmp_path / "file")
    with pytest.raises(FileNotFoundError, match="input not found: nope.png"):
        list_inputs([tmp_path / "nope.png"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no input images"):
        list_inputs([tmp_path / "empty"])


def test_extension_per_input(tmp_path):
    _png(tmp_path / "in" / "rgb.png", mode="RGB")
    _png(tmp_path / "in" / "rgba.png", mode="RGBA")
    inputs = list_inputs([tmp_path / "in"])
    channels = {item.path.name: probe_image(item.path).channels for item in inputs}
    plan = plan_outputs(inputs, tmp_path / "out",
                        extension=lambda item: fallback_suffix(".jpg", channels[item.path.name]))
    assert sorted(i.target.name for i in plan.items) == ["rgb.jpg", "rgba.png"]


# -- atomic writes ----------------------------------------------------------------------------------

def test_atomic_write_replaces_completely(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    write_bytes_atomic(target, b"first")
    write_bytes_atomic(target, b"second")
    assert target.read_bytes() == b"second"
    assert [p.name for p in target.parent.iterdir()] == ["f.bin"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_write_leaves_nothing_partial_and_the_old_file_intact(tmp_path, error):
    target = tmp_path / "f.png"
    target.write_bytes(b"good earlier result")
    with pytest.raises(error), atomic_write(target) as stream:
        stream.write(b"half of a new fi")
        raise error()
    assert target.read_bytes() == b"good earlier result"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]
    fresh = tmp_path / "new.png"
    with pytest.raises(error), atomic_write(fresh) as stream:
        stream.write(b"half")
        raise error()
    assert not fresh.exists() and [p.name for p in tmp_path.iterdir()] == ["f.png"]


def test_no_clobber_publish_refuses_a_file_that_appeared(tmp_path, monkeypatch):
    target = tmp_path / "f.png"
    with pytest.raises(FileExistsError, match="appeared"), atomic_write(target, replace=False) as stream:
        stream.write(b"mine")
        target.write_bytes(b"someone else's")
    assert target.read_bytes() == b"someone else's"
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]
    write_bytes_atomic(tmp_path / "g.png", b"ok", replace=False)
    assert (tmp_path / "g.png").read_bytes() == b"ok"

    def no_links(*_args):
        raise OSError("hard links not supported")

    monkeypatch.setattr(atomic.os, "link", no_links)
    write_bytes_atomic(tmp_path / "h.png", b"fallback", replace=False)
    assert (tmp_path / "h.png").read_bytes() == b"fallback"
    with pytest.raises(FileExistsError):
        write_bytes_atomic(tmp_path / "h.png", b"again", replace=False)


def test_killed_writer_leftovers_are_hidden_and_removable(tmp_path):
    leftover = tmp_path / ".f.png.x1y2.partial"
    leftover.write_bytes(b"killed")
    assert is_partial_file(leftover) and not is_partial_file(tmp_path / "f.png")
    assert remove_stale_partials(tmp_path) == [leftover] and not leftover.exists()


# -- image files ------------------------------------------------------------------------------------

def test_16_bit_gray_round_trips_exactly(tmp_path):
    values = np.random.default_rng(0).integers(0, 65536, (7, 9), dtype=np.uint16)
    values[0, 0], values[0, 1] = 0, 65535
    Image.fromarray(values).save(tmp_path / "g16.png")
    loaded = read_image(tmp_path / "g16.png")
    assert loaded.pixels.shape == (7, 9, 1) and loaded.info.bit_depth == 16
    assert torch.allclose(loaded.pixels[:, :, 0].double(), torch.from_numpy(values / 65535.0), atol=1e-7)
    save_image(loaded.pixels, tmp_path / "out16.png", bit_depth=16)
    reread = Image.open(tmp_path / "out16.png")
    assert reread.mode.startswith("I;16") and (np.asarray(reread).astype(np.int64) == values).all()
    save_image(loaded.pixels, tmp_path / "out16.tif", bit_depth=16)
    assert (np.asarray(Image.open(tmp_path / "out16.tif")).astype(np.int64) == values).all()
    save_image(loaded.pixels, tmp_path / "out8.png")
    eight = np.asarray(Image.open(tmp_path / "out8.png")).astype(np.float64) / 255
    assert Image.open(tmp_path / "out8.png").mode == "L" and np.abs(eight - values / 65535).max() <= 0.5 / 255 + 1e-9


def test_float_tiff_keeps_its_range(tmp_path):
    values = np.random.default_rng(1).random((6, 8)).astype(np.float32)
    Image.fromarray(values).save(tmp_path / "f.tif")
    loaded = read_image(tmp_path / "f.tif")
    assert loaded.info.bit_depth == 32 and loaded.pixels.shape == (6, 8, 1)
    assert torch.allclose(loaded.pixels[:, :, 0], torch.from_numpy(values), atol=1e-7)
    save_image(loaded.pixels, tmp_path / "f16.png", bit_depth=16)
    assert np.abs(np.asarray(Image.open(tmp_path / "f16.png")) / 65535.0 - values).max() <= 0.5 / 65535 + 1e-7
    Image.fromarray(values * 1000 + 20).save(tmp_path / "wide.tif")
    wide = read_image(tmp_path / "wide.tif")  # beyond [0, 1]: /65535 as the values fit 16 bits
    assert torch.allclose(wide.pixels[:, :, 0], torch.from_numpy((values * 1000 + 20) / 65535), atol=1e-6)
    Image.fromarray(values * 4 - 2).save(tmp_path / "signed.tif")
    signed = read_image(tmp_path / "signed.tif")
    assert float(signed.pixels.min()) == 0 and float(signed.pixels.max()) == 1 and "stretched" in signed.notes[0]


def test_16_bit_colour_png_writer_is_exact(tmp_path):
    for channels in (2, 3, 4):
        values = np.random.default_rng(channels).integers(0, 65536, (5, 7, channels))
        save_image(torch.from_numpy(values / 65535.0), tmp_path / f"c{channels}.png", bit_depth=16)
        assert (_decode_png16((tmp_path / f"c{channels}.png").read_bytes()) == values).all()
        assert Image.open(tmp_path / f"c{channels}.png").size == (7, 5)  # Pillow accepts the file


@pytest.mark.parametrize("mode", ["1", "P", "PA", "CMYK", "I", "LA", "RGBA"])
def test_every_mode_loads_in_range(tmp_path, mode):
    rgb = np.random.default_rng(2).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    base = Image.fromarray(rgb)
    image = {
        "1": base.convert("1"), "P": base.convert("P"), "CMYK": base.convert("CMYK"),
        "I": Image.fromarray(rgb[:, :, 0].astype(np.int32) * 257), "LA": base.convert("LA"),
        "RGBA": base.convert("RGBA"), "PA": base.convert("P"),
    }[mode]
    path = tmp_path / ("x.tif" if mode in ("CMYK", "I") else "x.png")
    if mode == "PA":
        image.info["transparency"] = 0
        image.save(path, transparency=0)
    else:
        image.save(path)
    pixels = load_image(path)
    channels = {"1": 1, "P": 3, "PA": 4, "CMYK": 3, "I": 1, "LA": 2, "RGBA": 4}[mode]
    assert probe_image(path).channels == channels  # the probe predicts what loading gives
    assert pixels.shape == (5, 6, channels) and pixels.dtype == torch.float32
    assert 0 <= float(pixels.min()) and float(pixels.max()) <= 1
    if mode == "1":
        assert set(pixels.unique().tolist()) <= {0.0, 1.0}
    if mode == "I":
        assert torch.allclose(pixels[:, :, 0], torch.from_numpy(rgb[:, :, 0] / 255.0).float(), atol=1e-6)
    if mode == "CMYK":
        assert torch.allclose(pixels, torch.from_numpy(np.asarray(image.convert("RGB")) / 255.0).float())


def test_exif_orientation_is_applied(tmp_path):
    rgb = np.zeros((4, 8, 3), dtype=np.uint8)
    rgb[0, 0] = 255
    image = Image.fromarray(rgb)
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rot.png", exif=exif)
    pixels = load_image(tmp_path / "rot.png")
    assert pixels.shape == (8, 4, 3) and float(pixels[0, -1, 0]) == 1.0
    info = probe_image(tmp_path / "rot.png")
    assert (info.width, info.height) == (4, 8)
    with pytest.raises(ImageError, match=r"rot.png in .* is 4x8, more than 31 pixels"):
        probe_image(tmp_path / "rot.png", max_pixels=31)


def test_multi_frame_gives_the_first_frame_with_a_note(tmp_path):
    frames = [Image.fromarray(np.full((4, 4, 3), v, dtype=np.uint8)) for v in (10, 200)]
    frames[0].save(tmp_path / "anim.tif", save_all=True, append_images=frames[1:])
    loaded = read_image(tmp_path / "anim.tif")
    assert loaded.info.frames == 2 and "only the first" in loaded.notes[0]
    assert torch.allclose(loaded.pixels, torch.full((4, 4, 3), 10 / 255))


def test_bad_files_get_one_line_messages_naming_them(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image at all")
    good = _png(tmp_path / "good.png", size=(64, 64))
    (tmp_path / "trunc.png").write_bytes(good.read_bytes()[:-40])
    for name, pattern in [("empty.png", "is empty"), ("text.png", "not an image"),
                          ("trunc.png", "corrupt or truncated")]:
        with pytest.raises(ImageError, match=pattern) as info:
            probe_image(tmp_path / name)
        assert name in str(info.value) and str(tmp_path) in str(info.value) and "\n" not in str(info.value)
    assert probe_image(good).width == 64


def test_format_checks_and_save_errors(tmp_path):
    assert output_format(".png", 4) == "PNG" and output_format(".jpg", 3) == "JPEG"
    with pytest.raises(ImageError, match="JPEG cannot hold RGBA"):
        output_format(".jpg", 4)
    with pytest.raises(ImageError, match="16 bits"):
        output_format(".jpg", 3, 16)
    assert fallback_suffix(".jpg", 4) == ".png" and fallback_suffix(".jpg", 1) == ".jpg"
    with pytest.raises(ImageError, match=r"cannot save x\.jpg in .*JPEG cannot hold RGBA"):
        save_image(torch.zeros(2, 2, 4), tmp_path / "x.jpg")
    with pytest.raises(ImageError, match="NaN"):
        save_image(torch.full((2, 2, 3), float("nan")), tmp_path / "n.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ImageError, match="cannot write y.png in"):
        save_image(torch.zeros(2, 2, 3), tmp_path / "file" / "y.png")
