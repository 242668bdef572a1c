"""The probability models: the context model's passes are causal, the factorized tables are distributions, the
model file round-trips and is refused when it is not one of ours or belongs to another codec."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from scipy.special import expit
from scipy.stats import norm

from codec.common.config import ConfigError
from codec.entropy.discrete import logistic_mixture_bin_probability
from codec.entropy.models import (
    ContextModel,
    EntropyModelError,
    FactorizedModel,
    ProbabilityModel,
    channel_groups,
    check_model_codec,
    load_model,
    model_identity,
    save_model,
)
from codec.entropy.symbols import TABLE_FLOOR, factorized_tables


def in_memory(network) -> ProbabilityModel:
    return ProbabilityModel(network.double().eval().requires_grad_(False), {"kind": network.kind}, "0" * 16, "<memory>")


def test_channel_groups_cover_the_channels_in_order():
    assert channel_groups(4, 4) == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert channel_groups(16, 3) == [(0, 5), (5, 11), (11, 16)]
    with pytest.raises(ConfigError, match="groups"):
        channel_groups(4, 5)


def test_context_passes_code_every_symbol_once_and_see_only_earlier_passes():
    model = ContextModel(channels=6, groups=3, hidden=4)
    passes = model.passes(5, 7)
    coded = torch.zeros(6, 5, 7, dtype=torch.bool)
    for coding_pass in passes:
        assert torch.equal(coding_pass.known, coded)  # known = exactly what the passes before it coded
        assert not (coding_pass.target & coded).any()
        coded |= coding_pass.target
    assert coded.all()
    assert len(passes) == 6


def test_context_prediction_ignores_what_is_not_yet_decoded():
    """The decoder has zeros where the encoder has future symbols: predictions must not see the difference."""
    torch.manual_seed(0)
    model = ContextModel(channels=4, groups=2, hidden=8).double()
    for net in model.nets:
        torch.nn.init.normal_(net[-1].weight, std=0.3)
    zhat = torch.randn(1, 4, 6, 6, dtype=torch.float64)
    step = torch.full((1, 1, 1, 1), 0.5, dtype=torch.float64)
    for index, coding_pass in enumerate(model.passes(6, 6)):
        decoder_view = torch.where(coding_pass.known[None], zhat, torch.zeros(()))
        encoder_side = model.predict(index, coding_pass, zhat, step)
        decoder_side = model.predict(index, coding_pass, decoder_view, step)
        for a, b in zip(encoder_side, decoder_side):
            assert torch.equal(a, b)


def test_factorized_tables_are_the_normalised_mixture_with_a_floor():
    torch.manual_seed(0)
    network = FactorizedModel(channels=3, components=2)
    with torch.no_grad():
        network.loc.normal_()
    model = in_memory(network)
    step, low, high = 0.3, -40, 40
    tables = torch.from_numpy(factorized_tables(model, step, low, high))
    assert tables.shape == (3, 81)
    torch.testing.assert_close(tables.sum(-1), torch.ones(3, dtype=torch.float64), rtol=0, atol=81 * 2.0**-32)
    assert float(tables.min()) >= TABLE_FLOOR * 0.99
    centers = torch.arange(low, high + 1, dtype=torch.float64) * step
    c = 1
    raw = logistic_mixture_bin_probability(centers, step / 2, network.logits[c], network.loc[c],
                                           torch.exp(network.log_scale[c]))
    floored = (raw / raw.sum()).clamp_min(TABLE_FLOOR)
    torch.testing.assert_close(tables[c], floored / floored.sum(), rtol=0, atol=2.0**-32)


def test_fit_bins_are_delta_wide_around_y_delta_against_scipy():
    """The probability the fit minimises (bin_probability), per record at its own Δ, is the mass of
    [yΔ - Δ/2, yΔ + Δ/2] written out with scipy's CDFs: a mixture of logistics for the factorized model, a Gaussian
    for the context model (its last layers set to a known mean and scale per channel). Over every symbol the bins
    tile the line, so each record's masses sum to 1 whatever its Δ."""
    torch.manual_seed(0)
    step = torch.tensor([0.07, 0.4, 1.3], dtype=torch.float64)[:, None, None, None]
    y = torch.arange(-2000, 2000, dtype=torch.float64).reshape(1, 1, 1, -1).expand(3, 2, 1, -1)  # ±140 at Δ 0.07
    edges = (y * step - step / 2).numpy(), (y * step + step / 2).numpy()

    factorized = FactorizedModel(channels=2, components=3).double()
    with torch.no_grad():
        factorized.loc.normal_()
        factorized.logits.normal_()
    weights = torch.softmax(factorized.logits, -1).detach().numpy()[None, :, None, None, :]
    loc = factorized.loc.detach().numpy()[None, :, None, None, :]
    scale = np.exp(factorized.log_scale.detach().numpy())[None, :, None, None, :]
    expected = (weights * (expit((edges[1][..., None] - loc) / scale) - expit((edges[0][..., None] - loc) / scale))
                ).sum(-1)
    got = factorized.bin_probability(y, step).detach()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(got.sum(-1), torch.ones(3, 2, 1, dtype=torch.float64), rtol=1e-9, atol=0)

    context = ContextModel(channels=2, groups=1, hidden=4).double()
    mean, scale = np.array([0.3, -0.5]), np.array([0.2, 0.9])
    with torch.no_grad():
        for net in context.nets:
            net[-1].bias.copy_(torch.from_numpy(np.concatenate([mean, np.log(scale)])))
    mean, scale = mean[None, :, None, None], scale[None, :, None, None]
    expected = norm.cdf(edges[1], mean, scale) - norm.cdf(edges[0], mean, scale)
    got = context.bin_probability(y, step).detach()
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-9, atol=1e-15)
    torch.testing.assert_close(got.sum(-1), torch.ones(3, 2, 1, dtype=torch.float64), rtol=1e-9, atol=0)


def test_model_file_round_trips_and_its_identity_follows_its_content(tmp_path):
    torch.manual_seed(0)
    network = ContextModel(channels=4, groups=2, hidden=4)
    path = tmp_path / "m.safetensors"
    identity = save_model(network, path, codec_identity="ab" * 8, encoder_identity="cd" * 8,
                          normalisation={"scaling_factor": 0.5}, fit={"step_range": [0.1, 1.0]})
    loaded = load_model(path)
    assert loaded.identity == identity and loaded.kind == "context" and loaded.scaling_factor == 0.5
    for name, tensor in network.state_dict().items():
        assert torch.equal(loaded.network.state_dict()[name].float(), tensor)
        assert loaded.network.state_dict()[name].dtype == torch.float64  # coding runs in float64
    changed = {name: t.clone() for name, t in network.state_dict().items()}
    changed["nets.0.0.bias"][0] += 1e-6
    assert model_identity(loaded.metadata, changed) != identity


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


def test_a_missing_foreign_or_inconsistent_model_file_is_refused_naming_it(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(EntropyModelError) as exc:
        load_model(missing)
    assert str(missing) in one_line(exc)

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01 not safetensors")
    with pytest.raises(EntropyModelError) as exc:
        load_model(garbage)
    assert str(garbage) in one_line(exc)

    other = tmp_path / "weights.safetensors"  # a safetensors file, but of something else
    save_file({"w": torch.zeros(2)}, other)
    with pytest.raises(EntropyModelError) as exc:
        load_model(other)
    assert str(other) in one_line(exc) and "not an entropy model" in one_line(exc)

    bad = tmp_path / "bad.safetensors"
    save_model(FactorizedModel(4), bad, codec_identity="ab" * 8, encoder_identity=None,
               normalisation={"scaling_factor": 1.0}, fit={"step_range": [0.1, 1.0]})
    from safetensors import safe_open
    with safe_open(str(bad), framework="pt") as handle:
        metadata = json.loads(handle.metadata()["entropy_model"])
    metadata["config"]["channels"] = 8  # config no longer fits the tensors
    save_file({n: t for n, t in FactorizedModel(4).state_dict().items()}, bad,
              metadata={"entropy_model": json.dumps(metadata)})
    with pytest.raises(EntropyModelError) as exc:
        load_model(bad)
    assert str(bad) in one_line(exc)


def test_a_model_of_another_codec_is_refused_and_a_decoder_fine_tune_accepted(tmp_path):
    path = tmp_path / "m.safetensors"
    save_model(FactorizedModel(4), path, codec_identity="ab" * 8, encoder_identity="cd" * 8,
               normalisation={"scaling_factor": 1.0}, fit={"step_range": [0.1, 1.0]})
    model = load_model(path)
    check_model_codec(model, "ab" * 8, "cd" * 8)
    check_model_codec(model, "99" * 8, "cd" * 8)  # same encoder: a decoder-only fine-tune makes the same latents
    with pytest.raises(EntropyModelError) as exc:
        check_model_codec(model, "99" * 8, "77" * 8)
    assert str(path) in one_line(exc) and "abababab" in one_line(exc)


def test_fitting_lowers_the_bits_and_records_the_shards(model_files, tiny_shards):
    """40 steps on 8 records: the recorded bits are below what the untrained model gives the same latents."""
    from codec.shards.reader import LatentShards

    shards = LatentShards(tiny_shards)
    z = torch.stack([shards.scale(shards[i]["mean"]) for i in range(len(shards))]).double()
    step = torch.full((len(shards), 1, 1, 1), 0.3, dtype=torch.float64)
    y = torch.round(z / step)
    for name, path in model_files.items():
        fitted = load_model(path)
        assert fitted.metadata["codec"]["identity"] == shards.manifest["codec"]["identity"]
        assert fitted.scaling_factor == shards.scaling_factor
        symbols = y if fitted.transform is None else torch.round(fitted.transform.forward(z) / step)
        channels = symbols.shape[1]
        untrained = (FactorizedModel(channels) if fitted.kind == "factorized"
                     else ContextModel(channels, 4, 8)).double()
        with torch.no_grad():
            before = -torch.log2(untrained.bin_probability(symbols, step)).mean()
            after = -torch.log2(fitted.network.bin_probability(symbols, step)).mean()
        assert after < before, name


def test_a_transformed_model_keeps_its_basis_and_refuses_one_that_does_not_fit(model_files, tmp_path):
    from safetensors import safe_open

    model = load_model(model_files["context-klt-haar1"])
    assert model.transform.levels == 1 and model.metadata["latent_channels"] == 4
    assert model.network.config["channels"] == 16 and model.coded_shape((4, 7, 5)) == (16, 4, 3)
    basis = model.transform.channel_basis
    assert basis.dtype == torch.float64
    torch.testing.assert_close(basis @ basis.T, torch.eye(4, dtype=torch.float64), rtol=0, atol=1e-12)
    with safe_open(str(model_files["context-klt-haar1"]), framework="pt") as handle:
        tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        metadata = handle.metadata()
    # Another basis is another model: files made with one are refused by the other.
    swapped = tmp_path / "swapped.safetensors"
    save_file({**tensors, "transform.channel_basis": basis.flip(0).contiguous()}, str(swapped), metadata=metadata)
    assert load_model(swapped).identity != model.identity
    # A basis of 3 channels for a network of 16 bands is not this model.
    wrong = tmp_path / "wrong.safetensors"
    save_file({**tensors, "transform.channel_basis": torch.eye(3, dtype=torch.float64)}, str(wrong), metadata=metadata)
    with pytest.raises(EntropyModelError) as exc:
        load_model(wrong)
    assert str(wrong) in one_line(exc)
