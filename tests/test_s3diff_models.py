"""S3Diff model parts: modulated LoRA, the degradation modulator, de_net and the s3diff.pkl layout."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from onestep_sr.models.degradation_estimator import (
    BLUR_INDEX,
    NOISE_INDEX,
    estimate,
    load_degradation_estimator,
)
from onestep_sr.models.lora import LoRAPair
from onestep_sr.models.method_weights import detect_method
from onestep_sr.models.modulated_lora import (
    clear_modulation,
    inject_modulated_lora,
    modulated_lora_names,
    repeat_modulation,
    set_modulation,
    unet_block_index,
    vae_block_index,
)
from onestep_sr.models.s3diff_weights import apply_s3diff, parse_s3diff
from onestep_sr.models.weights_io import WeightsFileError, read_weights_file, write_safetensors_export

import synthetic_s3diff

SCORES = torch.tensor([[0.15, 0.8], [0.9, 0.05]])


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    """These tiny forwards are dominated by thread hand-off; on a busy CPU two spinning threads made
    the module 10x slower. One thread, restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def s3diff_files(tmp_path_factory, tiny_base):
    folder = tmp_path_factory.mktemp("s3diff")
    reference = synthetic_s3diff.write_s3diff_pkl(tiny_base, folder / "s3diff.pkl")
    de_state = synthetic_s3diff.write_de_net(folder / "de_net.pth")
    return folder, reference, de_state


@pytest.fixture(scope="module")
def s3diff_model(tiny_base, s3diff_files):
    folder, _, _ = s3diff_files
    weights = parse_s3diff(read_weights_file(folder / "s3diff.pkl"))
    unet, vae = copy.deepcopy(tiny_base.unet), copy.deepcopy(tiny_base.vae)
    modulator = apply_s3diff(unet, vae, weights)
    return unet, vae, modulator


def _inputs(batch: int):
    generator = torch.Generator().manual_seed(11)
    latent = torch.randn(batch, 4, 8, 8, generator=generator)
    text = torch.randn(batch, 77, 32, generator=generator)
    image = torch.rand(batch, 3, 32, 32, generator=generator) * 2 - 1
    return latent, text, image


# (a) the wrapper's forward against per-sample merged weights W + s * B @ M^T @ A ----------------------
def _close(got: torch.Tensor, expected: torch.Tensor, tol: float = 1e-5) -> bool:
    """Float32 agreement relative to the magnitude of the values compared."""
    return bool((got - expected).abs().max() <= tol * max(1.0, float(expected.abs().max())))


def _per_sample_weight(base: nn.Module, pair: LoRAPair, m: torch.Tensor, scale: float) -> torch.Tensor:
    """h'_j = sum_k h_k M_kj, so y = W x + s B M^T A x."""
    rank = pair.down.shape[0]
    delta = pair.up.reshape(-1, rank) @ m.T @ pair.down.reshape(rank, -1)
    return base.weight + scale * delta.reshape(base.weight.shape)


def test_modulated_linear_and_conv_match_merged_per_sample_weights():
    torch.manual_seed(1)
    rank, alpha = 3, 8.0
    holder = nn.ModuleDict({
        "lin": nn.Linear(6, 5),
        "conv": nn.Conv2d(4, 7, 3, stride=2, padding=1),
    })
    reference = copy.deepcopy(holder)
    pairs = {
        "lin": LoRAPair(down=torch.randn(rank, 6), up=torch.randn(5, rank)),
        "conv": LoRAPair(down=torch.randn(rank, 4, 3, 3), up=torch.randn(7, rank, 1, 1)),
    }
    assert inject_modulated_lora(holder, pairs, rank, alpha, {"lin": 0, "conv": 1}.__getitem__) == 2
    matrices = torch.randn(2, 2, rank, rank)
    set_modulation(holder, matrices)
    x_lin, x_conv = torch.randn(2, 9, 6), torch.randn(2, 4, 10, 12)
    scale = alpha / rank
    with torch.no_grad():
        got_lin, got_conv = holder["lin"](x_lin), holder["conv"](x_conv)
        for b in range(2):
            w_lin = _per_sample_weight(reference["lin"], pairs["lin"], matrices[b, 0], scale)
            expected = F.linear(x_lin[b], w_lin, reference["lin"].bias)
            assert _close(got_lin[b], expected)
            w_conv = _per_sample_weight(reference["conv"], pairs["conv"], matrices[b, 1], scale)
            expected = F.conv2d(x_conv[b : b + 1], w_conv, reference["conv"].bias, stride=2, padding=1)[0]
            assert _close(got_conv[b], expected)
        # the official einsum (src/model.py my_lora_fwd) gives the same
        h = F.conv2d(x_conv, pairs["conv"].down, stride=2, padding=1)
        h = torch.einsum("...khw,...kr->...rhw", h, matrices[:, 1])
        official = reference["conv"](x_conv) + scale * F.conv2d(h, pairs["conv"].up)
        assert _close(got_conv, official)
        # a single matrix set applies to every sample; other batch sizes are refused
        set_modulation(holder, matrices[:1])
        single = holder["lin"](x_lin)
        assert _close(single[0], got_lin[0])
        set_modulation(holder, repeat_modulation(matrices, 2))
        with pytest.raises(RuntimeError, match="4 sample"):
            holder["lin"](x_lin)
        assert _close(holder["lin"](torch.cat([x_lin, x_lin]))[2:], got_lin)
        clear_modulation(holder)
        with pytest.raises(RuntimeError, match="set_modulation"):
            holder["lin"](x_lin)
    with pytest.raises(ValueError, match="shape"):
        set_modulation(holder, torch.randn(2, 2, rank + 1, rank + 1))


def test_block_indices_follow_the_official_assignment():
    assert unet_block_index("down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q") == 2
    assert unet_block_index("mid_block.resnets.1.conv2") == 4
    assert unet_block_index("up_blocks.0.upsamplers.0.conv") == 5
    assert unet_block_index("up_blocks.3.attentions.2.proj_out") == 8
    assert unet_block_index("conv_out") == 9
    assert vae_block_index("encoder.down_blocks.3.resnets.1.conv1") == 3
    assert vae_block_index("encoder.mid_block.attentions.0.to_out.0") == 4
    assert vae_block_index("encoder.conv_in") == 5
    assert vae_block_index("encoder.conv_out") == 5


# (b) M = identity reproduces plain PEFT LoRA on the full models ---------------------------------------
def test_identity_modulation_equals_peft(tiny_base, s3diff_files, s3diff_model):
    _, reference, _ = s3diff_files
    unet, vae, _ = s3diff_model
    assert len(modulated_lora_names(unet)) == sum(k.endswith("lora_A.default.weight")
                                                  for k in reference.data["state_dict_unet"])
    assert all(name.startswith("encoder.") for name in modulated_lora_names(vae))
    set_modulation(unet, torch.eye(32).expand(1, 10, 32, 32))
    set_modulation(vae, torch.eye(16).expand(1, 6, 16, 16))
    latent, text, image = _inputs(2)
    with torch.no_grad():
        expected = reference.unet(latent, 999, encoder_hidden_states=text).sample
        got = unet(latent, 999, encoder_hidden_states=text).sample
        base = tiny_base.unet(latent, 999, encoder_hidden_states=text).sample
        expected_moments = reference.vae.encode(image).latent_dist.mean
        got_moments = vae.encode(image).latent_dist.mean
    assert (expected - base).abs().max() > 1e-2
    assert (got - expected).abs().max() < 1e-5
    assert (got_moments - expected_moments).abs().max() < 1e-5


# (c) a batch with two degradations equals two single runs ---------------------------------------------
def test_batched_degradations_equal_single_runs(s3diff_model):
    unet, vae, modulator = s3diff_model
    unet_m, vae_m = modulator(SCORES)
    latent, text, image = _inputs(2)
    latent, text, image = latent[:1].repeat(2, 1, 1, 1), text[:1].repeat(2, 1, 1), image[:1].repeat(2, 1, 1, 1)
    with torch.no_grad():
        set_modulation(unet, unet_m)
        set_modulation(vae, vae_m)
        batched = unet(latent, 999, encoder_hidden_states=text).sample
        batched_moments = vae.encode(image).latent_dist.mean
        for i in range(2):
            set_modulation(unet, unet_m[i : i + 1])
            set_modulation(vae, vae_m[i : i + 1])
            single = unet(latent[i : i + 1], 999, encoder_hidden_states=text[i : i + 1]).sample
            single_moments = vae.encode(image[i : i + 1]).latent_dist.mean
            assert (batched[i] - single[0]).abs().max() < 1e-5
            assert (batched_moments[i] - single_moments[0]).abs().max() < 1e-5
    # same input, different degradation: the modulation really changes the output
    assert (batched[0] - batched[1]).abs().max() > 1e-3
    assert (batched_moments[0] - batched_moments[1]).abs().max() > 1e-3


# (d) the modulator against a hand computation from the raw checkpoint tensors -------------------------
def test_modulator_matches_hand_computation(s3diff_files, s3diff_model):
    _, reference, _ = s3diff_files
    _, _, modulator = s3diff_model
    data = reference.data
    unet_m, vae_m = modulator(SCORES)
    assert unet_m.shape == (2, 10, 32, 32) and vae_m.shape == (2, 6, 16, 16)
    w = data["w"].detach()
    for b in range(2):
        s0, s1 = SCORES[b].tolist()
        features = torch.cat([torch.sin(2 * math.pi * s0 * w), torch.cos(2 * math.pi * s0 * w),
                              torch.sin(2 * math.pi * s1 * w), torch.cos(2 * math.pi * s1 * w)])
        for model, block, got, rank in (("unet", 7, unet_m, 32), ("vae", 4, vae_m, 16)):
            de_mlp, block_mlp = data[f"state_dict_{model}_de_mlp"], data[f"state_dict_{model}_block_mlp"]
            fuse = data[f"state_dict_{model}_fuse_mlp"]
            table = data["state_embeddings"][f"state_dict_{model}_block"]["weight"]
            de = torch.relu(de_mlp["0.weight"] @ features + de_mlp["0.bias"])
            blk = torch.relu(block_mlp["0.weight"] @ table[block] + block_mlp["0.bias"])
            flat = fuse["weight"] @ torch.cat([de, blk]) + fuse["bias"]
            expected = flat.reshape(rank, rank)  # row-major, as `.reshape(-1, r, r)` in the official code
            assert (got[b, block] - expected).abs().max() < 1e-5
            assert expected.abs().mean() > 0.05  # far from the near-zero init of a fresh S3Diff
    # moving to fp16 (as a model-wide .to(dtype) does) keeps the modulator in float32
    half = copy.deepcopy(modulator).to(torch.float16)
    assert half.w.dtype == torch.float32 and half.unet_fuse_mlp.weight.dtype == torch.float32
    assert torch.equal(half(SCORES)[0], unet_m)


def test_published_layout_is_recognised(s3diff_files):
    folder, _, _ = s3diff_files
    data = read_weights_file(folder / "s3diff.pkl")
    assert detect_method(data) == "s3diff"
    weights = parse_s3diff(data)
    assert weights.unet_adapter.scale == 0.25 and weights.vae_adapter.scale == 0.5
    assert set(weights.unet_trained) == {"conv_in.weight", "conv_in.bias"}
    assert "conv_in" not in weights.unet_adapter.pairs and "conv_out" in weights.unet_adapter.pairs
    assert "encoder.conv_in" in weights.vae_adapter.pairs
    assert not any(name.startswith("decoder") or "quant" in name for name in weights.vae_adapter.pairs)


def test_incomplete_or_foreign_s3diff_files_are_refused(tiny_base, s3diff_files):
    folder, _, _ = s3diff_files
    data = read_weights_file(folder / "s3diff.pkl")
    with pytest.raises(WeightsFileError, match="state_embeddings"):
        parse_s3diff({k: v for k, v in data.items() if k != "state_embeddings"})
    truncated = dict(data, state_dict_unet={k: v for k, v in data["state_dict_unet"].items()
                                            if not k.startswith("mid_block.resnets.0.conv1.")})
    with pytest.raises(WeightsFileError, match="mid_block.resnets.0.conv1"):
        apply_s3diff(copy.deepcopy(tiny_base.unet), copy.deepcopy(tiny_base.vae), parse_s3diff(truncated))
    broken_fuse = dict(data, state_dict_unet_fuse_mlp={"weight": torch.zeros(5, 320), "bias": torch.zeros(5)})
    with pytest.raises(WeightsFileError, match="do not fit"):
        parse_s3diff(broken_fuse)
    # img2img-turbo style skip_conv entries are not used by S3Diff and are ignored
    with_skip = dict(data, state_dict_vae={**data["state_dict_vae"], "decoder.skip_conv_1.weight": torch.zeros(4)})
    assert parse_s3diff(with_skip).vae_adapter.pairs.keys() == parse_s3diff(data).vae_adapter.pairs.keys()


# (e) de_net ---------------------------------------------------------------------------------------------
def _de_net_by_hand(state: dict, x: torch.Tensor, branch: int) -> torch.Tensor:
    h = F.conv2d(x, state[f"conv_first.{branch}.weight"], state[f"conv_first.{branch}.bias"], padding=1)
    for index in range(9):
        p = f"body.{branch}.{index}"
        if index == 6:
            h = F.conv2d(h, state[f"{p}.weight"], state[f"{p}.bias"], stride=2, padding=1)
            continue
        r = F.relu(F.conv2d(h, state[f"{p}.conv1.weight"], state[f"{p}.conv1.bias"], padding=1))
        h = h + F.conv2d(r, state[f"{p}.conv2.weight"], state[f"{p}.conv2.bias"], padding=1)
    pooled = h.mean(dim=(2, 3))
    hidden = F.relu(F.linear(pooled, state[f"fc_degree.{branch}.0.weight"], state[f"fc_degree.{branch}.0.bias"]))
    return torch.sigmoid(F.linear(hidden, state[f"fc_degree.{branch}.2.weight"], state[f"fc_degree.{branch}.2.bias"]))[:, 0]


def test_de_net_loads_strict_and_scores(s3diff_files):
    folder, _, state = s3diff_files
    net = load_degradation_estimator(folder / "de_net.pth")
    assert set(net.state_dict()) == set(state)
    assert sum(p.numel() for p in net.parameters()) == 2_351_362  # 9.4 MB as float32, the published size
    image = torch.rand(2, 3, 20, 28, generator=torch.Generator().manual_seed(2))
    scores = estimate(net, image)
    assert scores.shape == (2, 2) and scores.dtype == torch.float32
    assert ((scores >= 0) & (scores <= 1)).all()
    for branch in (BLUR_INDEX, NOISE_INDEX):
        assert (scores[:, branch] - _de_net_by_hand(state, image, branch)).abs().max() < 1e-5
    assert (BLUR_INDEX, NOISE_INDEX) == (0, 1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        estimate(net, image * 2 - 1)


def test_de_net_file_errors(tmp_path, s3diff_files):
    folder, _, _ = s3diff_files
    with pytest.raises(WeightsFileError, match="de_net.pth") as missing:
        load_degradation_estimator(tmp_path / "de_net.pth")
    assert str(tmp_path) in str(missing.value)
    corrupt = tmp_path / "de_net_corrupt.pth"
    corrupt.write_bytes((folder / "de_net.pth").read_bytes()[:5000])
    with pytest.raises(WeightsFileError, match="de_net_corrupt.pth") as error:
        load_degradation_estimator(corrupt)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(WeightsFileError, match="not S3Diff's degradation estimator"):
        load_degradation_estimator(folder / "s3diff.pkl")
    state = torch.load(folder / "de_net.pth", weights_only=True)
    state["body.0.6.weight"] = torch.zeros(64, 64, 3, 3)
    wrong = tmp_path / "wrong_shape.pth"
    torch.save(state, wrong)
    with pytest.raises(WeightsFileError, match="body.0.6.weight"):
        load_degradation_estimator(wrong)


# (f) the safetensors export keeps everything, nested state_embeddings and w included ------------------
def test_safetensors_export_round_trip(tmp_path, s3diff_files):
    folder, _, _ = s3diff_files
    data = read_weights_file(folder / "s3diff.pkl")
    export = tmp_path / "s3diff.safetensors"
    write_safetensors_export(data, export, "s3diff")
    back = read_weights_file(export)
    assert detect_method(back) == "s3diff"
    assert back["unet_lora_target_modules"] == data["unet_lora_target_modules"]
    assert back["vae_lora_target_modules"] == data["vae_lora_target_modules"]
    assert (back["rank_unet"], back["rank_vae"]) == (32, 16)
    assert torch.equal(back["w"], data["w"])
    for key in ("state_dict_vae_block", "state_dict_unet_block"):
        assert torch.equal(back["state_embeddings"][key]["weight"], data["state_embeddings"][key]["weight"])
    original, restored = parse_s3diff(data), parse_s3diff(back)
    assert original.modulator_state.keys() == restored.modulator_state.keys()
    assert all(torch.equal(original.modulator_state[k], restored.modulator_state[k]) for k in original.modulator_state)
    for name, pair in original.unet_adapter.pairs.items():
        assert torch.equal(pair.up, restored.unet_adapter.pairs[name].up)
    de_export = tmp_path / "de_net.safetensors"
    write_safetensors_export(read_weights_file(folder / "de_net.pth"), de_export, "s3diff_de_net")
    image = torch.rand(1, 3, 16, 16)
    assert torch.equal(estimate(load_degradation_estimator(de_export), image),
                       estimate(load_degradation_estimator(folder / "de_net.pth"), image))
