"""Hero-SR: the DTSM (layout, forward, timestep selection) and the LoRA weights layout."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from onestep_sr.models.dtsm import (
    CANDIDATE_TIMESTEPS,
    DTSMFormatError,
    TimeStepSelector,
    dtsm_input,
    load_dtsm_state,
    predict_timesteps,
    select_timesteps,
)
from onestep_sr.models.hero_weights import apply_hero_sr, parse_hero_sr
from onestep_sr.models.lora import LoRAFormatError
from onestep_sr.models.method_weights import detect_method
from onestep_sr.models.schedule import alphas_cumprod, x0_from_eps
from onestep_sr.models.weights_io import WeightsFileError, read_weights_file, write_safetensors_export

# chi-square 0.999 quantile for 5 degrees of freedom (scipy.stats.chi2.ppf(0.999, 5)).
CHI2_999_DOF5 = 20.515


@pytest.fixture(scope="module")
def hero_pkl(tmp_path_factory, tiny_base):
    import synthetic_hero  # a test helper beside this file (conftest puts tests/ on sys.path)

    path = tmp_path_factory.mktemp("hero") / "hero_sr_model.pkl"
    peft_unet, peft_vae, dtsm_state = synthetic_hero.write_hero_pkl(tiny_base, path)
    return path, peft_unet, peft_vae, dtsm_state


def _dominant_logits() -> torch.Tensor:
    logits = torch.full((101,), -3.0)
    logits[[0, 10, 50, 77, 100]] = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0])
    return logits


# (a) seeded sampling ---------------------------------------------------------------------------------

def test_sampling_is_seeded_and_reproducible():
    logits = torch.zeros(8, 101)
    first = select_timesteps(logits, "sample", seed=11)
    assert first.dtype == torch.long and first.shape == (8,)
    assert torch.equal(first, select_timesteps(logits, "sample", seed=11))
    assert not torch.equal(first, select_timesteps(logits, "sample", seed=12))
    assert set(first.tolist()) <= set(CANDIDATE_TIMESTEPS.tolist())
    assert len(set(first.tolist())) > 1  # images of a batch get independent draws


def test_sampling_equals_published_gumbel_softmax_draws():
    """Same seed -> the very t the release's F.gumbel_softmax(hard=True) picks under manual_seed."""
    logits = torch.randn(64, 101, generator=torch.Generator().manual_seed(0))
    time_list = CANDIDATE_TIMESTEPS.float()
    for seed in (0, 1, 1234):
        torch.manual_seed(seed)
        official = (time_list * F.gumbel_softmax(logits, tau=1, hard=True)).sum(dim=1)
        assert torch.equal(official, official.round())  # the hard one-hot gives exact integers
        assert torch.equal(select_timesteps(logits, "sample", seed=seed), official.long())


def test_sampling_distribution_matches_softmax():
    logits = _dominant_logits()
    draws = select_timesteps(logits.expand(20000, 101), "sample", seed=2024)
    probs = logits.double().softmax(0)
    bins = [0, 10, 50, 77, 100]
    observed = [int((draws == CANDIDATE_TIMESTEPS[i]).sum()) for i in bins]
    expected = [20000 * float(probs[i]) for i in bins]
    observed.append(20000 - sum(observed))  # every other candidate pooled
    expected.append(20000 - sum(expected))
    chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected, strict=True))
    assert min(expected) > 5
    assert chi2 < CHI2_999_DOF5, (observed, expected, chi2)


# (b) argmax and fixed ---------------------------------------------------------------------------------

def test_argmax_picks_the_largest_logit():
    logits = torch.randn(5, 101, generator=torch.Generator().manual_seed(3))
    got = select_timesteps(logits, "argmax")
    assert torch.equal(got, CANDIDATE_TIMESTEPS[logits.argmax(1)])
    assert int(select_timesteps(_dominant_logits()[None], "argmax")) == 1


def test_fixed_accepts_any_training_timestep_and_validates():
    logits = torch.zeros(3, 101)
    assert select_timesteps(logits, "fixed", fixed=0).tolist() == [0, 0, 0]
    assert select_timesteps(logits, "fixed", fixed=500).tolist() == [500] * 3  # not a candidate: allowed
    assert select_timesteps(logits, "fixed", fixed=999).tolist() == [999] * 3
    for bad in (-1, 1000, 2.5, None, True):
        with pytest.raises(ValueError, match="fixed timestep|integer timestep"):
            select_timesteps(logits, "fixed", fixed=bad)
    with pytest.raises(ValueError, match="unknown timestep mode"):
        select_timesteps(logits, "gumbel")


# (c, d) per-image timesteps and the x0 formula ------------------------------------------------------

def test_per_image_timesteps_in_x0_and_unet(tiny_base):
    generator = torch.Generator().manual_seed(4)
    latent = torch.randn(3, 4, 8, 8, generator=generator)
    eps = torch.randn(3, 4, 8, 8, generator=generator)
    text = torch.randn(3, 77, 32, generator=generator)
    steps = torch.tensor([1, 499, 999])
    schedule = alphas_cumprod()
    together = x0_from_eps(latent, eps, steps, schedule)
    with torch.no_grad():
        batched = tiny_base.unet(latent, steps, encoder_hidden_states=text).sample
        as_float = tiny_base.unet(latent, steps.float(), encoder_hidden_states=text).sample  # the release's dtype
        for i in range(3):
            one = slice(i, i + 1)
            assert torch.equal(together[one], x0_from_eps(latent[one], eps[one], int(steps[i]), schedule))
            alone = tiny_base.unet(latent[one], int(steps[i]), encoder_hidden_states=text[one]).sample
            assert torch.allclose(batched[one], alone, atol=1e-5)
    assert torch.equal(batched, as_float)


def test_t999_reproduces_the_osediff_formula():
    generator = torch.Generator().manual_seed(5)
    latent = torch.randn(2, 4, 8, 8, generator=generator)
    eps = torch.randn(2, 4, 8, 8, generator=generator)
    schedule = alphas_cumprod()
    per_image = x0_from_eps(latent, eps, torch.tensor([999, 999]), schedule)
    assert torch.equal(per_image, x0_from_eps(latent, eps, 999, schedule))
    # The release's own arithmetic: diffusers' float32 alphas_cumprod, indexed at t.long(), in float64.
    diffusers_ac = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    a_t = diffusers_ac.double()[torch.tensor([999.0, 999.0]).long()].reshape(-1, 1, 1, 1)
    hero = (latent.double() - (1 - a_t) ** 0.5 * eps.double()) / a_t**0.5
    assert torch.allclose(per_image.double(), hero, rtol=1e-5, atol=1e-5)


# (e) the DTSM network ---------------------------------------------------------------------------------

def _reference_logits(state: dict[str, torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    """The published TimeAdaptive forward, from raw tensors, with BatchNorm in eval mode."""
    def bn(x, p):
        return F.batch_norm(x, state[f"{p}.running_mean"], state[f"{p}.running_var"], state[f"{p}.weight"],
                            state[f"{p}.bias"], training=False, eps=1e-5)

    height, width = image.shape[-2:]
    rows = (torch.arange(128) * height / 128).floor().long()  # nearest: src = floor(dst * in / out)
    cols = (torch.arange(128) * width / 128).floor().long()
    x = image[:, :, rows][:, :, :, cols]
    x = F.silu(bn(F.conv2d(x, state["conv1.0.weight"], state["conv1.0.bias"], padding=1), "conv1.1"))
    for i in range(3):
        p = f"blocks.{i}"
        out = F.silu(bn(F.conv2d(x, state[f"{p}.conv1.weight"], padding=1), f"{p}.bn1"))
        out = bn(F.conv2d(out, state[f"{p}.conv2.weight"], padding=1), f"{p}.bn2")
        x = F.silu(out + x)
    x = F.silu(bn(F.conv2d(x, state["conv2.0.weight"], state["conv2.0.bias"], padding=1), "conv2.1"))
    x = F.adaptive_avg_pool2d(x, (7, 7)).flatten(1)
    x = F.linear(F.silu(F.linear(x, state["fc.0.weight"], state["fc.0.bias"])), state["fc.2.weight"],
                 state["fc.2.bias"])
    return F.layer_norm(x, (101,), state["fc.3.weight"], state["fc.3.bias"], eps=1e-5)


def test_dtsm_loads_strict_and_matches_functional_forward(hero_pkl):
    path, _, _, dtsm_state = hero_pkl
    weights = parse_hero_sr(read_weights_file(path))
    dtsm = load_dtsm_state(weights.dtsm_state)
    assert set(dtsm.state_dict()) == set(dtsm_state)  # every published key, nothing else
    TimeStepSelector().load_state_dict(dtsm_state, strict=True)
    assert not dtsm.training
    image = torch.rand(2, 3, 200, 328, generator=torch.Generator().manual_seed(6)) * 2 - 1
    expected = _reference_logits(dtsm_state, image)
    with torch.no_grad():
        got = dtsm(dtsm_input(image))
    assert (got - expected).abs().max() < 1e-4
    dtsm.train()  # predict_timesteps must still use running statistics
    timesteps, logits = predict_timesteps(dtsm, image, mode="argmax")
    assert dtsm.training
    assert (logits - expected).abs().max() < 1e-4
    assert torch.equal(timesteps, CANDIDATE_TIMESTEPS[expected.argmax(1)])
    sampled, _ = predict_timesteps(dtsm, image, mode="sample", seed=9)
    assert torch.equal(sampled, predict_timesteps(dtsm, image, mode="sample", seed=9)[0])


def test_dtsm_optional_keys_and_layout_errors():
    import synthetic_hero

    state = synthetic_hero.dtsm_state_dict()
    lenient = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") and k != "time_list"}
    assert torch.equal(load_dtsm_state(lenient).candidates, CANDIDATE_TIMESTEPS)
    with pytest.raises(DTSMFormatError, match=r"missing \['fc.3.weight'\]"):
        load_dtsm_state({k: v for k, v in state.items() if k != "fc.3.weight"})
    with pytest.raises(DTSMFormatError, match="DataParallel"):
        load_dtsm_state({f"module.{k}": v for k, v in state.items()})
    with pytest.raises(DTSMFormatError, match="fc.0.weight: shape"):
        load_dtsm_state({**state, "fc.0.weight": torch.zeros(1000, 64 * 16)})
    with pytest.raises(DTSMFormatError, match="integer timesteps"):
        load_dtsm_state({**state, "time_list": state["time_list"] + 0.5})


# (f) LoRA: PEFT path vs merged weights ----------------------------------------------------------------

def test_published_layout_is_parsed(hero_pkl):
    path, _, _, _ = hero_pkl
    data = read_weights_file(path)
    assert detect_method(data) == "hero_sr"
    weights = parse_hero_sr(data)
    assert [a.name for a in weights.unet_adapters] == ["default"]
    assert [a.name for a in weights.vae_adapters] == ["vae"]
    assert weights.unet_adapters[0].scale == 1.0 and weights.vae_adapters[0].scale == 4.0  # alpha 8 / r
    assert set(weights.unet_trained) == {"conv_in.weight", "conv_in.bias"}
    assert "conv_in" in weights.unet_adapters[0].pairs and "quant_conv" in weights.vae_adapters[0].pairs
    assert weights.vae_trained == {}


def test_peft_adapters_equal_merged_weights(tiny_base, hero_pkl):
    path, peft_unet, peft_vae, _ = hero_pkl
    unet = copy.deepcopy(tiny_base.unet)
    vae = copy.deepcopy(tiny_base.vae)
    shared = unet.down_blocks[0].resnets[0].conv1.weight
    before = shared.detach().clone()
    dtsm = apply_hero_sr(unet, vae, parse_hero_sr(read_weights_file(path)))
    assert isinstance(dtsm, TimeStepSelector) and torch.equal(shared, before)
    generator = torch.Generator().manual_seed(8)
    latent = torch.randn(2, 4, 8, 16, generator=generator)
    text = torch.randn(2, 77, 32, generator=generator)
    image = torch.rand(1, 3, 64, 48, generator=generator) * 2 - 1
    steps = torch.tensor([249, 999])
    with torch.no_grad():
        expected = peft_unet(latent, steps, encoder_hidden_states=text).sample
        got = unet(latent, steps, encoder_hidden_states=text).sample
        base = tiny_base.unet(latent, steps, encoder_hidden_states=text).sample
        expected_moments = peft_vae.encode(image).latent_dist.mean
        got_moments = vae.encode(image).latent_dist.mean
        base_moments = tiny_base.vae.encode(image).latent_dist.mean
    assert (expected - base).abs().max() > 1e-2 and (expected_moments - base_moments).abs().max() > 1e-2
    assert (got - expected).abs().max() < 1e-5
    assert (got_moments - expected_moments).abs().max() < 1e-5


# (g) errors and export ----------------------------------------------------------------------------------

def test_incomplete_or_foreign_files_are_reported(hero_pkl):
    path, _, _, _ = hero_pkl
    data = read_weights_file(path)
    with pytest.raises(WeightsFileError, match="'rank_vae'.*not a complete hero_sr_model.pkl"):
        parse_hero_sr({k: v for k, v in data.items() if k != "rank_vae"})
    renamed = {k.replace(".default.", ".default_encoder."): v for k, v in data["state_dict_unet"].items()}
    with pytest.raises(WeightsFileError, match="default_encoder"):
        parse_hero_sr({**data, "state_dict_unet": renamed})
    with pytest.raises(WeightsFileError, match="no LoRA weights"):
        parse_hero_sr({**data, "state_dict_vae": {}})
    with pytest.raises(LoRAFormatError, match="rank"):
        parse_hero_sr({**data, "rank_unet": 4})
    with pytest.raises(WeightsFileError, match="positive integer"):
        parse_hero_sr({**data, "rank_vae": "two"})
    truncated = {k: v for k, v in data["state_dict_vae"].items() if "lora_B" not in k or "quant_conv" not in k}
    with pytest.raises(LoRAFormatError, match="no lora_B"):
        parse_hero_sr({**data, "state_dict_vae": truncated})


def test_wrong_base_is_named(tiny_base, hero_pkl):
    from diffusers import UNet2DConditionModel

    from tinymodels import TINY_UNET_CONFIG

    path, _, _, _ = hero_pkl
    weights = parse_hero_sr(read_weights_file(path))
    fewer = UNet2DConditionModel(**{**TINY_UNET_CONFIG, "layers_per_block": 1})
    with pytest.raises(LoRAFormatError, match="SD-Turbo"):
        apply_hero_sr(fewer, copy.deepcopy(tiny_base.vae), weights)


def test_safetensors_export_round_trip(tmp_path, hero_pkl):
    path, _, _, _ = hero_pkl
    data = read_weights_file(path)
    out = tmp_path / "hero_sr.safetensors"
    write_safetensors_export(data, out, method="hero_sr")
    back = read_weights_file(out)
    assert detect_method(back) == "hero_sr"
    assert back["unet_lora_target_modules"] == data["unet_lora_target_modules"]
    for group in ("state_dict_unet", "state_dict_vae", "state_dict_time_adaptive"):
        assert back[group].keys() == data[group].keys()
        for key, value in data[group].items():
            assert torch.equal(back[group][key], value), key
    image = torch.rand(1, 3, 96, 96, generator=torch.Generator().manual_seed(10)) * 2 - 1
    logits = [predict_timesteps(load_dtsm_state(parse_hero_sr(d).dtsm_state), image, "argmax")[1] for d in (data, back)]
    assert torch.equal(logits[0], logits[1])
