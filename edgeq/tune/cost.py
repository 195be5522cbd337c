"""Latency estimated from a per-profile cost model, for targets this machine cannot time (Core ML off macOS runs
in edgeq's MIL reference executor, whose numpy speed says nothing about a device).

A batch-1 roofline per weight layer: time = max(weight bytes the layer reads / memory bandwidth, its
multiply-adds x 2 / peak compute), summed over layers. What a layer reads depends on where Core ML decompresses
its weights: "just in time" in the compute unit (the stored bytes cross the memory bus: the Neural Engine from
iOS17 for palettes and int8, coremltools' opt-palettization-perf guide), or once at load (the dense fp16 weight
crosses it every inference, so compression buys no speed: coreml-cpu's profile says its formats are
decompressed at load). Not modelled: attention's activation-by-activation matmuls, elementwise ops,
activations' own traffic, dispatch overhead, lookup cost of grouped palettes. The figures rank candidates on
one device; they are no prediction of milliseconds, and every report calls them estimates.
"""

from __future__ import annotations

from dataclasses import dataclass

DENSE_BITS = 16  # Core ML's quantized programs compute in fp16 (footprint.float_bits_of): a decompressed weight is fp16


@dataclass(frozen=True)
class CostModel:
    device: str  # what the figures describe
    bandwidth_gb_s: float  # memory bandwidth the weights stream over
    peak_tflops: float  # fp16 compute the layers run at
    just_in_time: tuple[str, ...]  # stored weight dtypes read as stored; the rest read as dense fp16
    basis: str  # where the figures come from, printed with every estimate

    def describe(self) -> str:
        return (f"estimated, not measured: roofline of {self.device} ({self.bandwidth_gb_s:g} GB/s, {self.peak_tflops:g} TFLOPS fp16; "
                f"weights read as stored: {', '.join(self.just_in_time) or 'none'}, others as fp16); {self.basis}")


_LUTS = ("lut2", "lut3", "lut4", "lut6", "lut8")
_ANE = CostModel(
    "Apple M1 Neural Engine", 68.25, 11.0,  # LPDDR4X-4266 on a 128-bit bus; Apple's 11 TOPS figure for the M1 ANE
    just_in_time=("int8", *_LUTS),  # palettes and per-channel int8 decompressed in the unit (iOS17+)
    basis="Apple's published M1 figures",
)
COST_MODELS = {
    "coreml-ane": _ANE,
    # Core ML picks the unit: ANE-eligible layers as on the ANE; int4/int3/int2 per-block codes are no ANE format
    # (the profile's note: they fall back to CPU/GPU), counted decompressed.
    "coreml": CostModel("Apple M1 (Core ML, all compute units)", _ANE.bandwidth_gb_s, _ANE.peak_tflops, _ANE.just_in_time,
                        "Apple's published M1 figures; per-block int4/int3/int2 layers counted as fp16 (no ANE format)"),
    # Every compressed format decompressed at load (coreml-cpu.toml's summary): compression buys no speed here.
    "coreml-cpu": CostModel("Apple M1 CPU (4 performance cores)", 68.25, 0.82, (),
                            "4 cores x 4 128-bit FMA pipes x 8 fp16 lanes x 2 x 3.2 GHz, no AMX"),
}


def cost_model(profile) -> CostModel | None:
    """The profile's cost model (by id, else a Core ML profile's generic one); None where none is known."""
    model = COST_MODELS.get(profile.id)
    if model is None and profile.runtime.value == "coreml":
        model = COST_MODELS["coreml"]
    return model


@dataclass(frozen=True)
class LayerWork:
    macs: int  # multiply-adds of one inference at the example's shapes
    read_share: float  # share of the weight one inference reads (1; an embedding reads only its looked-up rows)


def layer_work(model) -> dict[str, LayerWork]:
    """Per quantizable layer (user FQN), its multiply-adds and weight share read, from one forward of the
    model's example inputs (the fixed shapes Core ML converts at)."""
    import torch
    from torch import nn

    from edgeq.compress.apply import quantizable_layers

    work: dict[str, LayerWork] = {}
    hooks = []

    def record(fqn):
        def hook(module, _inputs, output):
            out = output[0] if isinstance(output, tuple) else output
            weight = module.weight
            if isinstance(module, nn.Embedding):
                work[fqn] = LayerWork(0, min(1.0, out.numel() / max(weight.numel(), 1)))
            else:  # Linear (out, in), Conv (out, in/groups, *kernel): each output element takes one weight row
                work[fqn] = LayerWork(int(out.numel() * (weight.numel() // weight.shape[0])), 1.0)
        return hook

    for fqn, layer in quantizable_layers(model.module):
        hooks.append(layer.register_forward_hook(record(fqn)))
    try:
        with torch.no_grad():
            model.module(*model.example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    return work


def estimate_ms(storage, work: dict[str, LayerWork], cost: CostModel) -> float:
    """Estimated milliseconds of one inference of an artifact whose weights are stored as `storage`
    (footprint.WeightStorage); layers the forward did not reach (and the OTHER row) read once, no compute."""
    seconds = 0.0
    for row in storage.layers:
        stored = row.bits / 8
        dense = row.weights * DENSE_BITS / 8
        read = stored if (not row.quantized or row.dtype in cost.just_in_time) else dense
        figures = work.get(row.name, LayerWork(0, 1.0))
        seconds += max(read * figures.read_share / (cost.bandwidth_gb_s * 1e9), 2 * figures.macs / (cost.peak_tflops * 1e12))
    return seconds * 1e3
