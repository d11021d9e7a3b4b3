"""Arbitrary-bit quantization: packing, quantized layers against float32, the int8 GEMM against an
exact integer reference, bytes, a tiny UNet end to end, and state-dict round trips."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load, save
from torch import nn

from hybrid_sd.lowbit import (
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    dequantize_model,
    pack_codes,
    quantize_model,
    unpack_codes,
)
from hybrid_sd.lowbit.int8 import int8_gemm, quantize_activations
from hybrid_sd.lowbit.onednn import OneDnnConv2d, OneDnnLinear
from hybrid_sd.lowbit.packing import code_range

BITS = range(2, 9)

# Relative error ||y_q - y|| / ||y|| against float32 on the layers of `float_layers` (seed 0), with
# int8 activations. Measured, Linear / Conv2d, group_size 32 asymmetric (per-channel symmetric):
#   W2 0.327/0.323 (0.494/0.493)  W3 0.137/0.136 (0.162/0.163)  W4 0.064/0.063 (0.071/0.071)
#   W5 0.031/0.030 (0.034/0.033)  W6 0.016/0.016 (0.017/0.018)  W7 0.010/0.010 (0.011/0.010)
#   W8 0.008/0.008 (0.008/0.008); with float activations W7 0.007 and W8 0.004, the rest as above.
# Bounds are about 1.5x the worst measured value.
ERROR_BOUND = {2: 0.75, 3: 0.25, 4: 0.11, 5: 0.05, 6: 0.027, 7: 0.017, 8: 0.012}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(3, 7), (5, 13, 1), (2, 3, 17), (64,), (), (4, 0, 5)])
def test_packing_round_trips_exactly(bits: int, signed: bool, shape: tuple[int, ...]):
    low, high = code_range(bits, signed)
    generator = torch.Generator().manual_seed(bits)
    codes = torch.randint(low, high + 1, shape, generator=generator)
    if codes.numel() > 1:  # both ends of the range appear
        codes.view(-1)[:2] = torch.tensor([low, high])
    packed = pack_codes(codes, bits, signed)
    n = shape[-1] if shape else 1
    assert packed.dtype == torch.uint8
    assert packed.shape[-1] == -(-n * bits // 8)  # dense: ceil(n * bits / 8) bytes a row
    unpacked = unpack_codes(packed, bits, shape, signed)
    assert unpacked.dtype == (torch.int8 if signed else torch.uint8)
    assert torch.equal(unpacked.long(), codes)


def test_packing_rejects_codes_out_of_range():
    with pytest.raises(ValueError, match="codes"):
        pack_codes(torch.tensor([4]), 3, signed=True)
    with pytest.raises(ValueError, match="bits"):
        pack_codes(torch.tensor([1]), 9, signed=False)


def float_layers() -> tuple[nn.Linear, torch.Tensor, nn.Conv2d, torch.Tensor]:
    torch.manual_seed(0)
    # 16 * 3 * 3 = 144 inputs a row: group size 32 leaves a short last group.
    return nn.Linear(256, 128), torch.randn(64, 256), nn.Conv2d(16, 32, 3, padding=1), torch.randn(2, 16, 12, 12)


@pytest.mark.parametrize("activation_bits", [8, 16])
@pytest.mark.parametrize(("group_size", "symmetric"), [(32, False), (None, True)])
def test_layers_match_float_within_bound(activation_bits: int, group_size: int | None, symmetric: bool):
    linear, x, conv, image = float_layers()
    errors = {}
    for bits in BITS:
        config = QuantConfig(bits, activation_bits, group_size, symmetric)
        errors[bits] = (
            relative_error(QuantLinear.from_float(linear, config)(x), linear(x)),
            relative_error(QuantConv2d.from_float(conv, config)(image), conv(image)),
        )
        assert max(errors[bits]) < ERROR_BOUND[bits], (bits, errors[bits])
    for kind in range(2):
        widths = [errors[bits][kind] for bits in BITS]
        assert widths == sorted(widths, reverse=True), widths


def test_int8_gemm_accumulates_exactly():
    generator = torch.Generator().manual_seed(0)
    for rows, inner, cols in [(1, 3, 5), (17, 64, 24), (100, 4096, 77)]:
        a = torch.randint(-128, 128, (rows, inner), dtype=torch.int8, generator=generator)
        b = torch.randint(-128, 128, (cols, inner), dtype=torch.int8, generator=generator)
        assert torch.equal(int8_gemm(a, b).long(), a.long() @ b.long().T)


@pytest.mark.parametrize(("bits", "group_size", "symmetric"), [(8, None, True), (4, 32, False), (3, 48, True)])
def test_int8_path_equals_integer_reference(bits: int, group_size: int | None, symmetric: bool):
    linear, x, _, _ = float_layers()
    layer = QuantLinear.from_float(linear, QuantConfig(bits, 8, group_size, symmetric))
    weight = layer.packed_weight().unpack()
    x_codes, x_scales = quantize_activations(x)
    expected = torch.zeros(x.shape[0], linear.out_features, dtype=torch.float64)
    for group, start in enumerate(range(0, linear.in_features, weight.group_size)):
        columns = slice(start, start + weight.group_size)
        codes = weight.codes[:, columns].long()
        if weight.zero_points is not None:
            codes = codes - weight.zero_points[:, group : group + 1].long()
        expected += (x_codes[:, columns].long() @ codes.T).double() * weight.scales[:, group].double()
    expected = expected * x_scales.double() + linear.bias.double()
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 12, 3, stride=2, padding=1),
        nn.Conv2d(8, 12, (3, 5), padding="same", dilation=2),
        nn.Conv2d(8, 12, 3, padding="valid", groups=4),
        nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect", bias=False),
        nn.Conv2d(8, 12, 1),
        nn.Conv2d(8, 12, 1, stride=2),
    ],
    ids=["stride", "same-dilation", "valid-groups", "reflect", "1x1", "1x1-stride"],
)
def test_conv_geometry(conv: nn.Conv2d):
    torch.manual_seed(0)
    image = torch.randn(2, 8, 11, 9)
    expected = conv(image)
    for activation_bits, bound in [(16, 0.01), (8, 0.02)]:
        layer = QuantConv2d.from_float(conv, QuantConfig(8, activation_bits))
        actual = layer(image)
        assert actual.shape == expected.shape
        assert relative_error(actual, expected) < bound
    assert layer(image[0]).shape == expected[0].shape


def test_packed_bytes():
    torch.manual_seed(0)
    layers = [nn.Linear(1280, 320), nn.Linear(320, 2560), nn.Conv2d(320, 320, 3)]
    fp16_bytes = sum(layer.weight.numel() * 2 for layer in layers)
    ratios = {}
    for bits in (2, 4, 8):
        config = QuantConfig(bits, group_size=64, symmetric=False)
        packed = sum(QuantConv2d.from_float(layer, config).weight_nbytes for layer in layers[2:])
        packed += sum(QuantLinear.from_float(layer, config).weight_nbytes for layer in layers[:2])
        ratios[bits] = fp16_bytes / packed
    # Measured: W2 6.99x, W4 3.71x, W8 1.91x (codes, fp16 scales and packed zero points counted).
    assert ratios[4] >= 3.5 and ratios[2] >= 6.0, ratios


def tiny_unet() -> UNet2DConditionModel:
    """The tiny SD 1.x "large" UNet of `hybrid_sd.tiny_models`, random weights."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=8,
    ).eval()


# Measured relative errors of the tiny UNet's output: W8A8 0.030, W4A16 (group 32) 0.189.
@pytest.mark.parametrize(
    ("config", "bound"),
    [(QuantConfig(8, 8), 0.06), (QuantConfig(4, 16, 32, False, skip=("conv_in", "*.to_k")), 0.3)],
    ids=["W8A8", "W4A16-g32"],
)
def test_quantize_unet_and_round_trip_state_dict(config: QuantConfig, bound: float):
    torch.manual_seed(1)
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 7, 32))
    model = tiny_unet()
    with torch.no_grad():
        expected = model(*inputs).sample
    report = quantize_model(model, config)
    assert all(isinstance(model.get_submodule(name), QuantLinear | QuantConv2d) for name in report.quantized)
    kept = list(report.kept)
    assert all(type(model.get_submodule(name)) in (nn.Linear, nn.Conv2d) for name in kept)
    assert ("conv_in" in kept) == ("conv_in" in config.skip)
    assert len(report.quantized) + len(kept) == sum(type(m) in (nn.Linear, nn.Conv2d) for m in tiny_unet().modules())
    with torch.no_grad():
        actual = model(*inputs).sample
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < bound

    skeleton = tiny_unet()
    quantize_model(skeleton, config)
    skeleton.load_state_dict(load(save(model.state_dict())))
    with torch.no_grad():
        assert torch.equal(skeleton(*inputs).sample, actual)


@pytest.mark.parametrize("kernel", ["int_mm", "onednn"])
def test_dequantized_model_is_float_with_the_quantized_weights(kernel: str):
    """Weight-only quantization (A16) computes with the dequantized weights, so its float copy gives the
    same outputs; with int8 activations the copy is the float model the weights alone make."""
    torch.manual_seed(1)
    inputs = (torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 7, 32))
    model = tiny_unet()
    with torch.no_grad():
        expected = model(*inputs).sample
    quantize_model(model, QuantConfig(8, 16 if kernel == "int_mm" else 8, kernel=kernel))
    restored = dequantize_model(model)
    assert not any(
        isinstance(module, QuantLinear | QuantConv2d | OneDnnLinear | OneDnnConv2d) for module in restored.modules()
    )
    assert [name for name, _ in restored.named_modules()] == [name for name, _ in tiny_unet().named_modules()]
    assert any(isinstance(module, QuantLinear | OneDnnLinear) for module in model.modules())  # the original stays
    with torch.no_grad():
        actual = restored(*inputs).sample
        if kernel == "int_mm":
            torch.testing.assert_close(actual, model(*inputs).sample, rtol=1e-4, atol=1e-5)
    assert 0 < relative_error(actual, expected) < 0.02  # W8 weights alone: measured 0.011 on this UNet
    restored.train()
    restored(*inputs).sample.square().mean().backward()  # trainable again
    assert all(parameter.grad is not None for parameter in restored.parameters() if parameter.requires_grad)


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"weight_bits": 1}, "weight_bits"),
        ({"weight_bits": 9}, "weight_bits"),
        ({"activation_bits": 4}, "activation_bits"),
        ({"group_size": 0}, "group_size"),
        ({"scale_dtype": "int8"}, "scale_dtype"),
        ({"skip": "conv_in"}, "skip"),
    ],
)
def test_bad_config_names_the_field(fields: dict, name: str):
    with pytest.raises(ValueError, match=name):
        QuantConfig(**fields)
