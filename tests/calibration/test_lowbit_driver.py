"""The layer-by-layer driver (calibration/lowbit/driver.py): it solves layers in forward order on a copy of the
model, feeds each layer the outputs of the already-quantized layers before it, batch by batch, and writes the
dequantized weights it returns into the copy."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from edgeq.calibration.lowbit.driver import gptq_solver, layer_rows, quantize_layers, rtn_solver
from edgeq.calibration.lowbit.grid import Grid
from edgeq.calibration.lowbit.rtn import RTN

GRID = Grid(3, 16)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 16)).eval()


class TinyBlock(nn.Module):
    """A pre-norm transformer block: q/k/v share one input, then o, then a 4x MLP."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.q, self.k, self.v, self.o = (nn.Linear(width, width) for _ in range(4))
        self.up, self.down = nn.Linear(width, 4 * width), nn.Linear(4 * width, width)

    def forward(self, x, mask):
        h = self.norm(x)
        scores = self.q(h) @ self.k(h).transpose(-1, -2) / h.shape[-1] ** 0.5
        attention = torch.softmax(scores.masked_fill(~mask[:, None, :], -1e9), dim=-1) @ self.v(h)
        x = x + self.o(attention)
        return x + self.down(torch.relu(self.up(x)))


def samples_for(shape: tuple[int, ...], count: int = 6, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(*shape, generator=generator)} for _ in range(count)]


class Recording(RTN):
    """Round-to-nearest that also records what the driver fed it: every batch's row count and the sum of the
    rows (what a sequential driver feeds can then be recomputed by hand)."""

    log: dict[str, Recording] = {}

    def __init__(self, fqn, module):
        super().__init__(module.weight, GRID)
        self.batches: list[int] = []
        self.total = torch.zeros(self.W.shape[1], dtype=torch.float64)
        Recording.log[fqn] = self

    def add_batch(self, rows):
        self.batches.append(rows.shape[0])
        self.total += rows.double().sum(dim=0)

    needs_inputs = True


def test_each_layer_is_fed_the_outputs_of_the_quantized_layers_before_it_one_batch_at_a_time():
    model, samples = tiny_mlp(), samples_for((3, 32))
    before = {name: value.clone() for name, value in model.state_dict().items()}
    Recording.log = {}
    result = quantize_layers(model, samples, ["0", "2", "4"], Recording, input_names=["x"])
    assert result.stages == [["0"], ["2"], ["4"]] and result.passes == 3
    assert all(log.batches == [3] * len(samples) for log in Recording.log.values())  # streamed, never stacked
    fc1 = result.weights["0"].dequantize()
    expected = sum(torch.relu(s["x"] @ fc1.T + model[0].bias).double().sum(dim=0) for s in samples)
    assert torch.allclose(Recording.log["2"].total, expected, rtol=1e-5)
    for fqn, weight in result.weights.items():  # the copy holds exactly what the codes mean
        assert torch.equal(result.module.get_submodule(fqn).weight, weight.dequantize())
    assert all(torch.equal(value, before[name]) for name, value in model.state_dict().items())  # the caller's model is untouched


def test_sequential_calibration_differs_from_calibrating_on_fp32_activations():
    model, samples = tiny_mlp(), samples_for((3, 32))
    sequential = quantize_layers(model, samples, ["0", "2", "4"], gptq_solver(GRID), input_names=["x"])
    parallel = quantize_layers(model, samples, ["0", "2", "4"], gptq_solver(GRID), input_names=["x"], sequential=False)
    assert parallel.passes == 1 and sequential.passes == 3
    assert torch.equal(sequential.weights["0"].codes, parallel.weights["0"].codes)  # the first layer sees the same inputs
    assert not torch.equal(sequential.weights["2"].codes, parallel.weights["2"].codes)
    assert not torch.equal(sequential.weights["4"].codes, parallel.weights["4"].codes)


def test_a_transformer_block_shares_one_pass_for_q_k_v_and_gptq_beats_rounding():
    torch.manual_seed(0)
    block = TinyBlock().eval()
    generator = torch.Generator().manual_seed(2)
    samples = []
    for _ in range(8):
        mask = torch.ones(2, 12, dtype=torch.bool)
        mask[1, 9:] = False  # padding at the end of the second sequence
        samples.append({"x": torch.randn(2, 12, 32, generator=generator), "mask": mask})
    layers = ["q", "k", "v", "o", "up", "down"]
    Recording.log = {}
    recorded = quantize_layers(block, samples, layers, Recording, row_mask=lambda s: s["mask"])
    assert recorded.stages == [["q", "k", "v"], ["o"], ["up"], ["down"]] and recorded.passes == 4
    assert Recording.log["q"].batches == [2 * 12 - 3] * 8  # padding rows never reach the solver

    grid = Grid(4, 16)
    solved = quantize_layers(block, samples, layers, gptq_solver(grid, actorder=True, static_groups=True))
    rounded = quantize_layers(block, samples, layers, rtn_solver(grid))
    assert rounded.passes == 0  # plain rounding needs no calibration pass
    with torch.no_grad():
        reference = [block(**s) for s in samples]
        error = lambda m: sum(float(((m(**s) - r) ** 2).sum()) for s, r in zip(samples, reference))  # noqa: E731
        assert error(solved.module) < error(rounded.module)
    assert all(weight.contiguous_groups for weight in solved.weights.values())


def test_conv_layers_are_solved_on_their_unfolded_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 1), nn.Flatten(), nn.Linear(16 * 16, 8)).eval()
    x = torch.randn(2, 4, 8, 8)
    rows = layer_rows(model[0], x)  # y = rows @ W^T, laid out [batch, positions] x [C*kh*kw]
    expected = model[0](x).permute(0, 2, 3, 1).reshape(-1, 8) - model[0].bias
    assert torch.allclose(rows @ model[0].weight.reshape(8, -1).T, expected, atol=1e-5)
    samples = samples_for((2, 4, 8, 8), count=4)
    result = quantize_layers(model, samples, ["0", "2", "4"], gptq_solver(Grid(4, 4)), input_names=["x"])
    assert result.weights["0"].shape == (8, 36) and result.module[0].weight.shape == (8, 4, 3, 3)
    assert torch.equal(result.module[0].weight, result.weights["0"].dequantize().reshape(8, 4, 3, 3))


def test_layers_the_driver_cannot_take_are_named():
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="no such layers in the model: 9"):
        quantize_layers(model, [], ["9"], rtn_solver(GRID))
    with pytest.raises(ValueError, match="1: LayerNorm is not a layer"):
        quantize_layers(model, [], ["1"], rtn_solver(GRID))
    with pytest.raises(ValueError, match="2: Conv2d with groups=2"):
        quantize_layers(model, [], ["2"], rtn_solver(GRID))
    with pytest.raises(ValueError, match="at least one calibration sample"):
        quantize_layers(model, [], ["0"], rtn_solver(GRID))


@pytest.mark.ci_may_skip("CI machines have no GPU; the device machine runs this test")
@pytest.mark.ci_may_skip("CI machines have no GPU; the device machine runs this test")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (the suite never needs one)")
def test_calibration_on_cuda_means_the_same_as_on_cpu():
    model, samples = tiny_mlp(), samples_for((3, 32))
    solver = gptq_solver(GRID, actorder=True, static_groups=True)
    on_cpu = quantize_layers(model, samples, ["0", "2", "4"], solver, input_names=["x"])
    on_gpu = quantize_layers(model, samples, ["0", "2", "4"], solver, input_names=["x"], device="cuda")
    assert next(on_gpu.module.parameters()).device.type == "cuda"
    for fqn, weight in on_gpu.weights.items():
        assert weight.codes.device.type == "cuda"
        assert (weight.codes.cpu() == on_cpu.weights[fqn].codes).double().mean() >= 0.98, fqn
