"""k-means palettes: better than a uniform grid with as many levels, weighted where asked, deterministic,
and in Core ML's constexpr_lut_to_dense layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeq.calibration.lowbit.grid import Grid
from edgeq.calibration.lowbit.kmeans import PALETTE_BITS, Palette, kmeans_solver, palettize
from tests.conftest import COREML


def _gaussian(rows=64, columns=96, seed=0):
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed))


def _heavy_tailed(rows=64, columns=96, seed=1):
    torch.manual_seed(seed)
    return torch.distributions.StudentT(3.0).sample((rows, columns))


def _uniform_per_tensor_error(w: torch.Tensor, bits: int, symmetric: bool) -> float:
    """Round-to-nearest on one min-max grid for the whole tensor (as many levels as the palette)."""
    flat = w.reshape(1, -1)
    grid = Grid(bits, None, symmetric=symmetric)
    scale, zero = grid.fit(flat)
    return (grid.round_trip(flat, scale, zero) - flat).pow(2).mean().item()


@pytest.mark.parametrize("make", [_gaussian, _heavy_tailed], ids=["gaussian", "student-t3"])
@pytest.mark.parametrize("bits", [2, 3, 4, 6, 8])
def test_palette_beats_uniform_rounding_per_tensor(make, bits):
    w = make()
    palette = palettize(w, bits)
    error = (palette.dequantize() - w).pow(2).mean().item()
    uniform = min(_uniform_per_tensor_error(w, bits, symmetric) for symmetric in (True, False))
    assert error <= uniform, f"{bits}-bit palette MSE {error:.3g} > uniform per-tensor MSE {uniform:.3g}"


def test_weighted_kmeans_reduces_the_weighted_error():
    w = _gaussian(32, 128)
    # a few input channels with large inputs (diag(H) 100x the rest) whose weights are also spread wider:
    # an unweighted palette spends its levels on the many small weights of the unimportant channels
    importance = torch.ones(128)
    importance[:8] = 100.0
    w[:, :8] *= 4
    plain = palettize(w, 3, weights=None)
    weighted = palettize(w, 3, weights=importance)

    def weighted_error(palette: Palette) -> float:
        return ((palette.dequantize() - w).pow(2) * importance).sum().item()

    assert weighted_error(weighted) < 0.8 * weighted_error(plain)
    # ... and a uniform weighting is the unweighted clustering
    assert torch.equal(palettize(w, 3, weights=torch.full((128,), 2.0)).lut, plain.lut)


def test_palette_is_deterministic_for_a_seed():
    w = _heavy_tailed()
    first, second = palettize(w, 4, seed=3), palettize(w, 4, seed=3)
    assert torch.equal(first.lut, second.lut) and torch.equal(first.indices, second.indices)


@pytest.mark.parametrize("bits", PALETTE_BITS)
def test_lut_has_exactly_two_to_the_bits_entries(bits):
    tiny = torch.tensor([[0.5, -1.0], [2.0, 0.5]])  # 3 distinct values: duplicates fill the LUT
    palette = palettize(tiny, bits)
    assert palette.lut.shape == (1, 2**bits)
    assert palette.indices.dtype == torch.uint8 and int(palette.indices.max()) < 2**bits
    assert bool((palette.lut[:, 1:] >= palette.lut[:, :-1]).all())  # sorted ascending
    if bits >= 2:  # enough entries for every distinct value: exact
        assert torch.equal(palette.dequantize(), tiny)


def test_grouped_channels_use_their_own_lut():
    w = _gaussian(32, 16)
    w[16:] *= 10  # the second half of the output channels lives on another scale
    grouped = palettize(w, 2, per="grouped_channels", group_channels=16)
    per_tensor = palettize(w, 2)
    assert grouped.lut.shape == (2, 4) and grouped.coreml_lut().shape == (2, 1, 4, 1)
    assert torch.equal(grouped.channel_group(), torch.arange(32) // 16)
    assert grouped.lut[1].abs().max() > 5 * grouped.lut[0].abs().max()
    grouped_error = (grouped.dequantize() - w).pow(2).mean()
    assert grouped_error < (per_tensor.dequantize() - w).pow(2).mean()


def test_fp16_lut_is_exact_in_fp16():
    w = _gaussian() * 1e-2
    palette = palettize(w, 4, lut_dtype=torch.float16)
    assert torch.equal(palette.lut, palette.lut.half().float())
    # indices point at the nearest (fp16) entry
    distance = (w.reshape(-1, 1) - palette.lut[0].reshape(1, -1)).abs()
    chosen = distance.gather(1, palette.indices.reshape(-1, 1).long()).squeeze(1)
    assert torch.equal(chosen, distance.min(dim=1).values)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"bits": 5}, "bits 5"),
        ({"bits": 4, "per": "block"}, "per='block'"),
        ({"bits": 4, "per": "grouped_channels", "group_channels": 5}, "does not divide the 64 output channels"),
        ({"bits": 4, "group_channels": 8}, "per='tensor'"),
        ({"bits": 4, "weights": -torch.ones(96)}, "non-negative"),
        ({"bits": 4, "weights": torch.ones(64)}, "expected [K]=96"),
    ],
)
def test_refusals_say_what_would_work(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        palettize(_gaussian(), **kwargs)


@COREML
def test_palette_maps_one_to_one_onto_coreml_lut_to_dense():
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import constexpr_lut_to_dense

    w = _gaussian(48, 32)
    for palette in (palettize(w, 3), palettize(w, 4, per="grouped_channels", group_channels=16, lut_dtype=torch.float16)):
        lut = palette.coreml_lut().numpy().astype(np.float16)
        dense = constexpr_lut_to_dense.decompress(palette.indices.numpy(), lut, None)
        np.testing.assert_array_equal(dense.astype(np.float32), palette.dequantize().half().float().numpy())


def test_driver_solver_weights_by_the_inputs_second_moments():
    layer = torch.nn.Linear(128, 32)
    x = torch.randn(4, 50, 128)
    x[..., :8] *= 10  # large inputs on 8 channels: diag(H) 100x there
    solver = kmeans_solver(3, per="grouped_channels", group_channels=8)("block.fc", layer)
    assert solver.needs_inputs
    for batch in x.split(2):
        solver.add_batch(batch)
    palette = solver.solve()
    energy = x.reshape(-1, 128).double().pow(2).mean(dim=0).float()
    expected = palettize(layer.weight, 3, per="grouped_channels", group_channels=8, weights=energy)
    torch.testing.assert_close(palette.lut, expected.lut, rtol=1e-5, atol=1e-7)
    assert not kmeans_solver(3, weighted=False)("block.fc", layer).needs_inputs
    with pytest.raises(ValueError, match="block.fc: no calibration inputs"):
        kmeans_solver(3)("block.fc", layer).solve()
