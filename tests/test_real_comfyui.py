"""Opt-in integration test against a real ComfyUI server (skipped unless COMFYUI_PATH is set).

    COMFYUI_PATH=/path/to/ComfyUI  COMFYUI_PYTHON=/path/to/comfy/venv/bin/python  \
    ONESTEP_SR_TEST_CACHE=/some/cache  python -m pytest tests/test_real_comfyui.py -q -s

What it does:
  * builds (once, cached in ONESTEP_SR_TEST_CACHE, else a pytest temp dir) a full-size random SD-2.1-base
    single-file checkpoint (fp16, LDM layout) and a synthetic full-size osediff.pkl (tests/full_size_fixtures.py);
  * puts them in a private model layout read through --extra-model-paths-config (checkpoints + onestep_sr),
    with private input/output/temp/user directories;
  * installs this repository into $COMFYUI_PATH/custom_nodes under an unusual folder name (a symlink, removed
    at the end) and loads only that custom node folder;
  * starts ComfyUI on CPU on a free port, checks our nodes are registered, runs the two shipped workflows
    (converted from the UI format with tests/workflow_api.py) through /prompt and checks the saved images;
  * compares the ComfyUI result with the command line (`onestep-sr upscale`) on the same input and settings;
  * wires an SD-1.5-shaped checkpoint (zeros) into Load OneStep SR and checks /history holds the one-line
    message, and upscales through a LoraLoader-patched MODEL (a small LoRA) and checks the LoRA counts;
  * measures the server's host RSS with only ComfyUI's checkpoint loaded, after the pack's run and after
    ComfyUI unloads models, and checks the pack keeps one base (no second copy of the checkpoint);
  * checks ComfyUI's /workflow_templates lists the shipped workflows and serves their thumbnails, and that the
    pack's frontend extension is served.
  * runs the HF-Diff workflow on tiny ResShift-family files (published key layout, an official-format YAML
    chosen in the loader's model_config) and compares it with the CLI too.

ComfyUI is started with COMFYUI_PYTHON (default: this interpreter). It needs torch, diffusers and
transformers, not an installed `onestep_sr`: ComfyUI loads the pack from the custom_nodes folder.
Runtime on CPU: several minutes (full-size SD-2 at 512 px working size), plus about two minutes the first
time to build the weights. Peak memory about 12 GiB; the CLI reference runs before the server starts so
the two never hold a model at the same time.
"""

from __future__ import annotations

import ctypes
import gc
import http.client
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
COMFYUI_PATH = os.environ.get("COMFYUI_PATH", "")

if not COMFYUI_PATH or not (Path(COMFYUI_PATH) / "main.py").is_file():
    pytest.skip("real-ComfyUI integration test: set COMFYUI_PATH to a ComfyUI checkout to run it",
                allow_module_level=True)

import full_size_fixtures  # noqa: E402
from workflow_api import node_ids, ui_to_api  # noqa: E402

COMFY_ROOT = Path(COMFYUI_PATH).resolve()
COMFY_PYTHON = os.environ.get("COMFYUI_PYTHON") or sys.executable
STARTUP_TIMEOUT_S = 120
RUN_TIMEOUT_S = 15 * 60
INPUT_NAME = "onestep_test_input.png"
INPUT_SIZE = (32, 24)  # (width, height)
HF_DIFF_CONFIG = "tiny_hf_diff.yaml"
SCALE = 4
# The OneStep Upscale settings of osediff_upscale_image.json, repeated for the CLI run.
UPSCALE_SETTINGS = {"prompt": "", "scale": 4.0, "color_fix": "method default", "latent_tile": 96,
                    "latent_overlap": 32, "vae_encoder_tile": 1024, "vae_decoder_tile": 224, "latent": "mean"}


# -- helpers --------------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write_input_image(path: Path) -> None:
    """A small RGB image with structure (gradients, a square, mild noise), deterministic."""
    width, height = INPUT_SIZE
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width, y / height, 0.5 + 0.4 * np.sin(x / 3.0) * np.cos(y / 4.0)], axis=-1)
    image[6:16, 10:22] = (0.9, 0.2, 0.1)
    image += rng.normal(0, 0.03, image.shape)
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8), "RGB").save(path)


def _release_freed_memory() -> None:
    """Return freed heap memory to the OS (glibc keeps it otherwise), so the ComfyUI server started after the
    in-process CLI run does not compete with gigabytes this process no longer uses."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _workflow(name: str) -> dict:
    return json.loads((REPO_ROOT / "workflows" / name).read_text(encoding="utf-8"))


class ComfyServer:
    """A ComfyUI process plus the small HTTP client the test needs."""

    def __init__(self, process: subprocess.Popen, url: str, log_path: Path, output_dir: Path, folder: str):
        self.process, self.url, self.log_path = process, url, log_path
        self.output_dir, self.folder = output_dir, folder
        self.object_info: dict = {}

    def log_tail(self, lines: int = 80) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def get(self, path: str, timeout: float = 30) -> dict:
        return json.loads(self.get_bytes(path, timeout))

    def get_bytes(self, path: str, timeout: float = 30) -> bytes:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return response.read()

    def post(self, path: str, body: dict, timeout: float = 60) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
                return response.status, json.loads(raw) if raw else {}
        except urllib.error.HTTPError as error:
            raw = error.read()
            try:
                return error.code, json.loads(raw)
            except ValueError:
                return error.code, {"raw": raw.decode(errors="replace")}

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"ComfyUI exited during startup (rc {self.process.returncode}); log tail:\n"
                            f"{self.log_tail()}")
            try:
                self.object_info = self.get("/object_info", timeout=30)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, ValueError):
                time.sleep(1)
        pytest.fail(f"ComfyUI did not answer /object_info within {timeout:.0f} s; log tail:\n{self.log_tail()}")

    def fail_if_dead(self, when: str) -> None:
        rc = self.process.poll()
        if rc is not None:
            hint = " (SIGKILL: out of memory?)" if rc == -9 else ""
            pytest.fail(f"ComfyUI exited {when}, rc {rc}{hint}; log tail:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = RUN_TIMEOUT_S, expect_error: bool = False) -> dict:
        """Queue an API prompt and wait for its history entry; fails with the node error on failure (or, with
        expect_error, returns the entry of a failed run and fails on success)."""
        self.fail_if_dead("before the workflow was queued")
        status, answer = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        assert status == 200, f"/prompt rejected the workflow ({status}): {json.dumps(answer, indent=1)}"
        assert not answer.get("node_errors"), answer
        prompt_id = answer["prompt_id"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                history = self.get(f"/history/{prompt_id}")
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException):
                self.fail_if_dead("while running the workflow")
                time.sleep(2)
                continue
            if prompt_id in history:
                entry = history[prompt_id]
                state = entry.get("status", {})
                if expect_error:
                    assert state.get("status_str") == "error", f"the workflow was expected to fail: {state}"
                    return entry
                if state.get("status_str") != "success" or not state.get("completed"):
                    errors = [data for event, data in state.get("messages", []) if event == "execution_error"]
                    details = "".join(
                        f"\n{e.get('node_type')} (node {e.get('node_id')}): {e.get('exception_type')}: "
                        f"{e.get('exception_message')}\n{''.join(e.get('traceback', []))}" for e in errors
                    )
                    pytest.fail(f"workflow failed: {state.get('status_str')}{details}\nlog tail:\n{self.log_tail()}")
                return entry
            time.sleep(2)
        self.post("/interrupt", {})
        pytest.fail(f"workflow did not finish within {timeout:.0f} s; log tail:\n{self.log_tail()}")

    def free(self, cached_outputs: bool = True) -> None:
        """Ask ComfyUI to unload its loaded models and (cached_outputs) drop its cached node outputs too."""
        if self.process.poll() is None:
            self.post("/free", {"unload_models": True, "free_memory": cached_outputs})
            time.sleep(2)  # handled by the prompt worker between queue items

    def memory(self) -> tuple[int, int]:
        """(current, peak) resident memory of the server process in bytes (Linux /proc)."""
        fields = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["VmHWM"]

    def reset_peak(self) -> None:
        Path(f"/proc/{self.process.pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS

    def settled_memory(self, wait: float = 14.0) -> int:
        """RSS once the prompt worker's periodic gc (every 10 s after a run or /free) has had its turn."""
        time.sleep(wait)
        return self.memory()[0]

    def saved_image(self, entry: dict, save_node: int) -> Path:
        images = entry["outputs"][str(save_node)]["images"]
        assert len(images) == 1, images
        info = images[0]
        assert info["type"] == "output", info
        path = self.output_dir / info["subfolder"] / info["filename"]
        assert path.is_file(), f"SaveImage reported {info} but {path} does not exist"
        return path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=30)


# -- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> tuple[Path, Path]:
    cache = os.environ.get("ONESTEP_SR_TEST_CACHE")
    folder = Path(cache) if cache else tmp_path_factory.mktemp("full_size_weights")
    started = time.monotonic()
    checkpoint, pkl = full_size_fixtures.ensure_full_size_weights(folder)
    print(f"\n[weights] {checkpoint.name}, {pkl.name} in {folder} ({time.monotonic() - started:.0f} s)")
    return checkpoint, pkl


@pytest.fixture(scope="module")
def layout(tmp_path_factory, weights) -> dict[str, Path]:
    """Private models/input/output directories; the model folders are read via extra_model_paths."""
    root = tmp_path_factory.mktemp("comfy_layout")
    checkpoint, pkl = weights
    paths = {name: root / name for name in ("models", "input", "output", "temp", "user", "cli")}
    for path in paths.values():
        path.mkdir()
    for folder in ("checkpoints", "onestep_sr", "loras"):
        (paths["models"] / folder).mkdir()
    (paths["models"] / "checkpoints" / checkpoint.name).symlink_to(checkpoint)
    (paths["models"] / "onestep_sr" / pkl.name).symlink_to(pkl)
    extras = Path(os.environ.get("ONESTEP_SR_TEST_CACHE") or root)
    sd15 = full_size_fixtures.ensure_sd15_checkpoint(extras)
    (paths["models"] / "checkpoints" / sd15.name).symlink_to(sd15)
    lora = full_size_fixtures.ensure_unet_lora(extras)
    (paths["models"] / "loras" / lora.name).symlink_to(lora)
    _write_input_image(paths["input"] / INPUT_NAME)
    import synthetic_resshift

    onestep = paths["models"] / "onestep_sr"
    synthetic_resshift.write_unet(synthetic_resshift.tiny_unet(), onestep / "HF-Diff.pth")
    synthetic_resshift.write_vq(synthetic_resshift.tiny_vq(), onestep / "autoencoder_vq_f4.pth")
    synthetic_resshift.write_official_yaml(onestep / HF_DIFF_CONFIG)
    paths["extra_paths"] = root / "extra_model_paths.yaml"
    paths["extra_paths"].write_text(
        "onestep_sr_integration_test:\n"
        f"    base_path: {paths['models']}\n"
        "    checkpoints: checkpoints\n"
        "    onestep_sr: onestep_sr\n"
        "    loras: loras\n",
        encoding="utf-8",
    )
    return paths


@pytest.fixture(scope="module")
def cli_reference(layout, weights) -> Path | str:
    """The CLI's result for the upscale workflow's input and settings, computed in-process BEFORE the server
    starts (so only one full-size model is in memory at a time). A failure is returned, not raised, so that
    only the comparison test fails."""
    from onestep_sr import cli

    checkpoint, pkl = weights
    target = layout["cli"] / "cli_x4.png"
    argv = ["upscale", str(layout["input"] / INPUT_NAME), "-o", str(target), "--base", str(checkpoint),
            "--weights", str(pkl), "--tokenizer", str(COMFY_ROOT / "comfy" / "sd1_tokenizer"),
            "--dtype", "fp32", "--device", "cpu", "--scale", str(UPSCALE_SETTINGS["scale"]),
            "--prompt", UPSCALE_SETTINGS["prompt"],
            "--latent-tile", str(UPSCALE_SETTINGS["latent_tile"]),
            "--latent-overlap", str(UPSCALE_SETTINGS["latent_overlap"]),
            "--vae-encoder-tile", str(UPSCALE_SETTINGS["vae_encoder_tile"]),
            "--vae-decoder-tile", str(UPSCALE_SETTINGS["vae_decoder_tile"])]
    # color_fix "method default" == no --color-fix; latent "mean" == no --seed.
    started = time.monotonic()
    try:
        rc = cli.main(argv)
    except Exception as error:  # reported by the comparison test
        return f"CLI raised {type(error).__name__}: {error}"
    finally:
        gc.collect()
        _release_freed_memory()
    print(f"[cli] onestep-sr upscale: rc {rc}, {time.monotonic() - started:.0f} s")
    if rc != 0 or not target.is_file():
        return f"CLI returned {rc}; output exists: {target.is_file()}"
    return target


def _optional_flags(flags: dict[str, list[str]]) -> list[str]:
    """Command-line flags this ComfyUI version knows (older checkouts lack some)."""
    known = (COMFY_ROOT / "comfy" / "cli_args.py").read_text(encoding="utf-8")
    return [part for flag, args in flags.items() if f'"{flag}"' in known for part in (flag, *args)]


@pytest.fixture(scope="module")
def comfy(layout, request, tmp_path_factory):
    """ComfyUI running with this repo installed as custom_nodes/OneStep-SR_test_<random>."""
    if any(item.name == "test_comfyui_matches_cli" for item in request.session.items):
        request.getfixturevalue("cli_reference")  # before the server starts: one full-size model at a time
    folder = f"OneStep-SR_test_{secrets.token_hex(4)}"
    link = COMFY_ROOT / "custom_nodes" / folder
    log_path = tmp_path_factory.mktemp("comfy_log") / "comfyui.log"
    port = _free_port()
    command = [
        COMFY_PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
        "--extra-model-paths-config", str(layout["extra_paths"]),
        "--input-directory", str(layout["input"]), "--output-directory", str(layout["output"]),
        *_optional_flags({
            "--temp-directory": [str(layout["temp"])],
            "--user-directory": [str(layout["user"])],
            "--database-url": ["sqlite:///:memory:"],
            "--disable-auto-launch": [],
            # Load only our folder, so other packs (or another copy of this one) cannot interfere.
            "--disable-all-custom-nodes": [],
            "--whitelist-custom-nodes": [folder],
        }),
    ]
    server = None
    link.symlink_to(REPO_ROOT, target_is_directory=True)
    try:
        # A fixed mmap threshold: glibc returns every freed allocation of 1 MiB or more to the OS at once, so
        # the server's RSS shows what is held, not what the heap happens to keep (the memory test reads it).
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=COMFY_ROOT, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=env)
        server = ComfyServer(process, f"http://127.0.0.1:{port}", log_path, layout["output"], folder)
        started = time.monotonic()
        server.wait_ready(STARTUP_TIMEOUT_S)
        print(f"[comfyui] ready on port {port} in {time.monotonic() - started:.0f} s "
              f"(custom_nodes/{folder}, log {log_path})")
        yield server
    finally:
        if server is not None:
            server.stop()
        link.unlink(missing_ok=True)


# -- tests ----------------------------------------------------------------------------------------------

def test_pack_registers_in_real_comfyui(comfy, weights):
    log = comfy.log_path.read_text(encoding="utf-8", errors="replace")
    failed = [line for line in log.splitlines()
              if comfy.folder in line and ("IMPORT FAILED" in line or "Cannot import" in line)]
    assert not failed, f"the pack failed to import: {failed}\nlog tail:\n{comfy.log_tail()}"
    from onestep_sr.nodes import NODE_CLASS_MAPPINGS

    expected = set(NODE_CLASS_MAPPINGS) | {"OneStepSR_Loader", "OneStepSR_Upscale"}
    missing = sorted(node for node in expected if node not in comfy.object_info)
    assert not missing, f"nodes not registered: {missing}\nlog tail:\n{comfy.log_tail()}"

    loader = comfy.object_info["OneStepSR_Loader"]
    assert {comfy.object_info[node]["python_module"] for node in expected} == {f"custom_nodes.{comfy.folder}"}
    assert loader["display_name"] == "Load OneStep SR"
    assert comfy.object_info["OneStepSR_Upscale"]["display_name"] == "OneStep Upscale"
    checkpoint, pkl = weights
    # The weights folder registered by the pack also holds the extra_model_paths.yaml entry for it.
    assert f"Adding extra search path onestep_sr {Path(comfy.output_dir).parent / 'models' / 'onestep_sr'}" in log
    assert pkl.name in loader["input"]["required"]["weights"][0], loader["input"]["required"]["weights"]
    assert checkpoint.name in loader["input"]["required"]["base"][0]


def _upscale_prompt(comfy, checkpoint: Path, pkl: Path) -> tuple[dict, int]:
    workflow = _workflow("osediff_upscale_image.json")
    (ckpt_node,) = node_ids(workflow, "CheckpointLoaderSimple")
    (loader,) = node_ids(workflow, "OneStepSR_Loader")
    (load_image,) = node_ids(workflow, "LoadImage")
    (upscale,) = node_ids(workflow, "OneStepSR_Upscale")
    (save,) = node_ids(workflow, "SaveImage")
    prompt = ui_to_api(workflow, comfy.object_info, overrides={
        ckpt_node: {"ckpt_name": checkpoint.name},
        loader: {"weights": pkl.name},
        load_image: {"image": INPUT_NAME},
        upscale: {"latent": "mean"},
        save: {"filename_prefix": "onestep_upscale_test"},
    })
    # The conversion itself: widgets by name, links as [id, slot], the seed's control value dropped.
    assert prompt[str(loader)]["inputs"]["base"] == "(use the MODEL/CLIP/VAE inputs)"
    assert prompt[str(loader)]["inputs"]["model"] == [str(ckpt_node), 0]
    assert prompt[str(loader)]["inputs"]["vae"] == [str(ckpt_node), 2]
    assert set(prompt[str(load_image)]["inputs"]) == {"image"}
    upscale_inputs = prompt[str(upscale)]["inputs"]
    assert upscale_inputs["image"] == [str(load_image), 0]
    assert {k: upscale_inputs[k] for k in UPSCALE_SETTINGS} == UPSCALE_SETTINGS
    assert upscale_inputs["seed"] == 0 and "control_after_generate" not in upscale_inputs
    return prompt, save


@pytest.fixture(scope="module")
def upscale_result(comfy, weights) -> Path:
    prompt, save = _upscale_prompt(comfy, *weights)
    started = time.monotonic()
    try:
        entry = comfy.run(prompt)
    finally:
        comfy.free()
    print(f"[comfyui] osediff_upscale_image.json: {time.monotonic() - started:.0f} s")
    return comfy.saved_image(entry, save)


def test_upscale_workflow(upscale_result):
    with Image.open(upscale_result) as image:
        assert image.format == "PNG"
        assert image.size == (INPUT_SIZE[0] * SCALE, INPUT_SIZE[1] * SCALE)
        pixels = np.asarray(image.convert("RGB"))
    assert pixels.std() > 1.0, "the upscaled image is flat"


def test_txt2img_then_upscale_workflow(comfy, weights):
    checkpoint, pkl = weights
    workflow = _workflow("txt2img_then_osediff_upscale.json")
    (latent,) = node_ids(workflow, "EmptyLatentImage")
    (sampler,) = node_ids(workflow, "KSampler")
    (loader,) = node_ids(workflow, "OneStepSR_Loader")
    (primitive,) = node_ids(workflow, "PrimitiveStringMultiline")
    (upscale,) = node_ids(workflow, "OneStepSR_Upscale")
    (save,) = node_ids(workflow, "SaveImage")
    overrides = {node: {"ckpt_name": checkpoint.name} for node in node_ids(workflow, "CheckpointLoaderSimple")}
    overrides.update({latent: {"width": 64, "height": 64, "batch_size": 1}, sampler: {"steps": 1},
                      loader: {"weights": pkl.name}, save: {"filename_prefix": "onestep_t2i_test"}})
    prompt = ui_to_api(workflow, comfy.object_info, overrides=overrides)
    sampler_inputs = prompt[str(sampler)]["inputs"]
    assert (sampler_inputs["seed"], sampler_inputs["cfg"], sampler_inputs["sampler_name"]) == (42, 7.0, "euler")
    assert sampler_inputs["denoise"] == 1.0 and sampler_inputs["steps"] == 1
    assert prompt[str(upscale)]["inputs"]["prompt"] == [str(primitive), 0]  # a linked widget takes the link
    started = time.monotonic()
    try:
        entry = comfy.run(prompt)
    finally:
        comfy.free()
    print(f"[comfyui] txt2img_then_osediff_upscale.json: {time.monotonic() - started:.0f} s")
    with Image.open(comfy.saved_image(entry, save)) as image:
        assert image.size == (64 * SCALE, 64 * SCALE)


def test_comfyui_matches_cli(upscale_result, cli_reference):
    """Same input, weights and settings through ComfyUI and through `onestep-sr upscale`.

    ComfyUI's SaveImage truncates (uint8 of 255*x) while our CLI rounds, so identical float results differ by
    0 or +1 (CLI - ComfyUI) per channel value; float noise below 0.5/255 cannot produce any other difference.
    """
    if isinstance(cli_reference, str):
        pytest.fail(cli_reference)
    comfy_pixels = np.asarray(Image.open(upscale_result).convert("RGB"), dtype=np.int16)
    cli_pixels = np.asarray(Image.open(cli_reference).convert("RGB"), dtype=np.int16)
    assert comfy_pixels.shape == cli_pixels.shape
    diff = cli_pixels - comfy_pixels
    values, counts = np.unique(diff, return_counts=True)
    histogram = dict(zip(values.tolist(), counts.tolist(), strict=True))
    print(f"[compare] CLI - ComfyUI (8-bit): {histogram}; distinct output values: {len(np.unique(cli_pixels))}")
    assert set(histogram) <= {0, 1}, (
        f"ComfyUI and CLI outputs differ beyond truncation vs rounding: {histogram}. The weights or the "
        "computation differ between the two paths, e.g. a LoRA merged into the fp16 file weights by the CLI but "
        "into ComfyUI's fp32 MODEL copy (the merged weights then differ by fp16 rounding)."
    )


# -- base checks, LoRA patches, templates ------------------------------------------------------------

def _loader_only_prompt(weights_name: str, checkpoint_name: str, lora_name: str | None = None) -> dict:
    """Load Checkpoint (-> LoraLoader) -> Load OneStep SR -> Preview Any: loads, never upscales."""
    prompt = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint_name}},
              "3": {"class_type": "OneStepSR_Loader",
                    "inputs": {"weights": weights_name, "base": "(use the MODEL/CLIP/VAE inputs)", "dtype": "fp32",
                               "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2]}},
              "4": {"class_type": "PreviewAny", "inputs": {"source": ["3", 0]}}}
    if lora_name:
        prompt["2"] = {"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1],
                                                             "lora_name": lora_name, "strength_model": 1.0,
                                                             "strength_clip": 1.0}}
        prompt["3"]["inputs"].update(model=["2", 0], clip=["2", 1])
    return prompt


def test_sd15_checkpoint_gives_a_one_line_message(comfy, weights):
    _, pkl = weights
    try:
        entry = comfy.run(_loader_only_prompt(pkl.name, full_size_fixtures.SD15_NAME), expect_error=True)
    finally:
        comfy.free()
    errors = [data for event, data in entry["status"]["messages"] if event == "execution_error"]
    assert len(errors) == 1 and errors[0]["node_type"] == "OneStepSR_Loader", errors
    message = errors[0]["exception_message"].strip()
    print(f"[comfyui] SD-1.5 into Load OneStep SR: {errors[0]['exception_type']}: {message}")
    assert "\n" not in message and "size mismatch" not in message and len(message) < 300, message
    assert message.endswith("is an SD-1.x checkpoint; the one-step SR methods need an SD-2.x base (SD-2.1-base "
                            "for OSEDiff, SD-Turbo for S3Diff/Hero-SR)"), message


def _with_lora(prompt: dict, lora_name: str) -> dict:
    """The upscale prompt with a LoraLoader between Load Checkpoint and Load OneStep SR."""
    prompt = json.loads(json.dumps(prompt))
    (ckpt,) = [k for k, v in prompt.items() if v["class_type"] == "CheckpointLoaderSimple"]
    (loader,) = [k for k, v in prompt.items() if v["class_type"] == "OneStepSR_Loader"]
    (save,) = [k for k, v in prompt.items() if v["class_type"] == "SaveImage"]
    prompt["900"] = {"class_type": "LoraLoader", "inputs": {"model": [ckpt, 0], "clip": [ckpt, 1], "lora_name": lora_name,
                                                           "strength_model": 1.0, "strength_clip": 1.0}}
    prompt[loader]["inputs"].update(model=["900", 0], clip=["900", 1])
    prompt[save]["inputs"]["filename_prefix"] = "onestep_lora_test"
    return prompt


def test_lora_patched_model_counts(comfy, weights, upscale_result):
    """LoraLoader's patch on the MODEL reaches the one-step model: the image changes, and no warning."""
    prompt, save = _upscale_prompt(comfy, *weights)
    started = time.monotonic()
    try:
        entry = comfy.run(_with_lora(prompt, full_size_fixtures.LORA_NAME))
    finally:
        comfy.free()
    print(f"[comfyui] LoraLoader -> Load OneStep SR -> OneStep Upscale: {time.monotonic() - started:.0f} s")
    log = comfy.log_path.read_text(encoding="utf-8", errors="replace")
    assert not [line for line in log.splitlines() if "not applied" in line], comfy.log_tail()
    applied = [line for line in log.splitlines() if "applying the MODEL/CLIP's patches" in line]
    assert applied, f"no sign of the LoRA being applied; log tail:\n{comfy.log_tail()}"
    print(f"[comfyui] {applied[-1].strip()}")
    with_lora = np.asarray(Image.open(comfy.saved_image(entry, save)).convert("RGB"), dtype=np.int16)
    without = np.asarray(Image.open(upscale_result).convert("RGB"), dtype=np.int16)
    changed = np.abs(with_lora - without)
    print(f"[compare] with - without LoRA: max |diff| {changed.max()}, {np.mean(changed > 0):.1%} of values differ")
    assert changed.max() > 2, "the LoRA on the MODEL did not change the one-step result"


def _unet_bytes(checkpoint: Path) -> int:
    """The checkpoint's UNet in float32, as ComfyUI holds it on the CPU: the size of a second copy."""
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as handle:
        return sum(4 * int(np.prod(handle.get_slice(k).get_shape())) for k in handle.keys()
                   if k.startswith("model.diffusion_model."))


def test_one_base_in_server_memory(comfy, weights):
    """Host RSS of the server: ComfyUI holding only its checkpoint, then after the pack's run (our model loaded
    on the CPU: the LoRA-patched layers are live, as with ComfyUI's own LoRAs), then after ComfyUI unloads
    models while both node outputs stay cached. Once unloaded, the pack must hold no second base: its modules
    share Load Checkpoint's tensors and the LoRA lives only in the patcher."""
    checkpoint, pkl = weights
    prompt, _save = _upscale_prompt(comfy, checkpoint, pkl)
    (ckpt,) = [k for k, v in prompt.items() if v["class_type"] == "CheckpointLoaderSimple"]
    comfy_only = {ckpt: prompt[ckpt], "901": {"class_type": "PreviewAny", "inputs": {"source": [ckpt, 0]}}}
    comfy.free()
    try:
        # ComfyUI applies /free's flags after a queue item, so they can drop the outputs of the item queued right
        # after them: the first run consumes them, the second holds the checkpoint (loaded now, or still cached).
        # Without this, the baseline was sometimes taken with the checkpoint already dropped (0.8 instead of 4.9 GiB).
        comfy.run(comfy_only)
        empty = comfy.settled_memory()
        comfy.run(comfy_only)  # the same node id and inputs: the upscale run reuses this cached checkpoint
        with_checkpoint = comfy.settled_memory()
        comfy.reset_peak()
        comfy.run(prompt)
        loaded, peak = comfy.memory()
        comfy.free(cached_outputs=False)  # unload models, keep the cached MODEL and our loader's output
        # ComfyUI reads /free's flags after a queue item; one posted while the worker is between items can wait
        # for the next one (its wake-up is lost), so queue the same prompt again: all cached, nothing runs.
        comfy.run(prompt)
        unloaded = comfy.settled_memory()
    finally:
        comfy.free()
    second_copy = _unet_bytes(checkpoint)
    gib = 1 << 30
    extra = unloaded - with_checkpoint
    print(f"[memory] server RSS: after /free + one queue item {empty / gib:.2f} GiB; ComfyUI checkpoint only {with_checkpoint / gib:.2f} "
          f"GiB; after the pack's run (model loaded on CPU) {loaded / gib:.2f} GiB, peak {peak / gib:.2f} GiB; "
          f"models unloaded, outputs cached {unloaded / gib:.2f} GiB -> the pack holds {extra / gib:.2f} GiB beyond "
          f"ComfyUI's own (a second UNet alone would be {second_copy / gib:.2f} GiB)")
    assert extra < second_copy / 4, (
        f"the pack holds {extra / gib:.2f} GiB beyond ComfyUI's checkpoint after unloading; a second copy of the "
        "base (merged LoRA layers, re-cast weights) is back")


def test_templates_are_listed_with_thumbnails(comfy):
    templates = comfy.get("/workflow_templates")
    shipped = sorted(path.stem for path in (REPO_ROOT / "workflows").glob("*.json"))
    assert sorted(templates.get(comfy.folder, [])) == shipped, templates
    for stem in shipped:
        served = comfy.get_bytes(f"/api/workflow_templates/{comfy.folder}/{stem}.jpg")
        assert served == (REPO_ROOT / "workflows" / f"{stem}.jpg").read_bytes()
        workflow = json.loads(comfy.get_bytes(f"/api/workflow_templates/{comfy.folder}/{stem}.json"))
        assert {m["directory"] for m in workflow["models"]} <= {"checkpoints", "onestep_sr", "clip_vision"}
    extensions = comfy.get("/extensions")
    assert any(path.endswith("/onestep_sr.js") for path in extensions), extensions
    upscale = comfy.object_info["OneStepSR_Upscale"]
    assert upscale["output"] == ["IMAGE", "MASK"]
    assert upscale["input"]["required"]["seed"][1]["control_after_generate"] is True
    print(f"[comfyui] /workflow_templates: {templates}")


def test_hf_diff_workflow_matches_cli(comfy, layout):
    """The HF-Diff workflow (no base, VQ autoencoder and config from models/onestep_sr) through ComfyUI,
    and the CLI on the same files, input and seed: equal up to SaveImage's truncation."""
    from onestep_sr import cli

    workflow = _workflow("hf_diff_upscale_image.json")
    (loader,) = node_ids(workflow, "OneStepSR_Loader")
    (load_image,) = node_ids(workflow, "LoadImage")
    (upscale,) = node_ids(workflow, "OneStepSR_Upscale")
    (save,) = node_ids(workflow, "SaveImage")
    assert HF_DIFF_CONFIG in comfy.object_info["OneStepSR_Loader"]["input"]["optional"]["model_config"][0]
    prompt = ui_to_api(workflow, comfy.object_info, overrides={
        loader: {"weights": "HF-Diff.pth", "model_config": HF_DIFF_CONFIG, "dtype": "fp32"},
        load_image: {"image": INPUT_NAME}, save: {"filename_prefix": "onestep_hf_diff_test"}})
    assert prompt[str(upscale)]["inputs"]["seed"] == 12345 and prompt[str(upscale)]["inputs"]["steps"] == 0
    started = time.monotonic()
    try:
        entry = comfy.run(prompt)
    finally:
        comfy.free()
    print(f"[comfyui] hf_diff_upscale_image.json: {time.monotonic() - started:.0f} s")
    result = comfy.saved_image(entry, save)
    onestep = layout["models"] / "onestep_sr"
    target = layout["cli"] / "hf_diff_x4.png"
    assert cli.main(["upscale", str(layout["input"] / INPUT_NAME), "-o", str(target), "--weights",
                     str(onestep / "HF-Diff.pth"), "--model-config", str(onestep / HF_DIFF_CONFIG),
                     "--seed", "12345", "--dtype", "fp32", "--device", "cpu"]) == 0
    comfy_pixels = np.asarray(Image.open(result).convert("RGB"), dtype=np.int16)
    cli_pixels = np.asarray(Image.open(target).convert("RGB"), dtype=np.int16)
    assert comfy_pixels.shape == (INPUT_SIZE[1] * SCALE, INPUT_SIZE[0] * SCALE, 3)
    values = set(np.unique(cli_pixels - comfy_pixels).tolist())
    print(f"[compare] HF-Diff CLI - ComfyUI (8-bit) values: {sorted(values)}")
    assert values <= {0, 1}
