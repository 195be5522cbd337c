"""A Hugging Face causal LM as a stateful Core ML model (iOS18): the KV cache lives in Core ML state (MLState).

Apple's recipe (coremltools "Stateful Models" guide, the on-device Llama / Mistral examples): the torch module
registers the cache as buffers, writes each step's keys and values into them in place, and is converted with
one `ct.StateType` per buffer; the ML program then reads the cache with `read_state` and stores it with
`write_state`, and an app runs it with `MLModel.make_state()` + `predict(inputs, state=state)`. The Hugging
Face module runs unchanged (its weights exactly, GQA, rotary and partial rotary, tied embeddings, biases,
GPT-2's Conv1D): only its Cache is ours (`_StateCache`, whose update writes into the buffers).

The program (one function for prefill and decode):
  inputs   input_ids       int32   [1, n]               n flexible, 1 ..= max_context (a RangeDim; 1 to decode)
           cache_position  int32   [n]                  the positions of these tokens (rope and cache rows)
           causal_mask     float32 [1, 1, n, max_context]  additive: 0 where row i may see cache row j, else
                                                        very negative (-1e30; -inf once rounded to fp16)
  states   k_cache, v_cache  float16 [layers, max_context, kv_heads, head_dim]
  output   logits          float32 [1, n, vocab]

Where this differs from Apple's example, and why (measured, torch 2.13 + coremltools 9.0):
- States are float16 even in the fp32 artifact: Core ML (iOS18) takes fp16 states only ("State only support
  fp16 dtype"). Compute stays fp32 (weights exact); keys and values are rounded to fp16 when stored.
- The cache write is an index_put at `cache_position` along the cache's leading axes (MIL `scatter_nd`), and
  attention reads all max_context rows with the mask hiding the unwritten ones. Apple's example slices the
  cache at `past:past+n` with `past` taken from the mask's shape; under torch.export that slice adds guards
  (n != max_context) that contradict the flexible range, and its TorchScript route fails in transformers 5's
  attention. Hence also the position-major layout [layers, max_context, kv_heads, head_dim]: coremltools lowers
  index_put to scatter_nd only when the indexed axes come first.

Low-bit (`plan`): the plan's linear layers become converters/coreml_lowbit.py's packed weights
(constexpr_blockwise_shift_scale with the plan's codes and fp16 scales verbatim, or palettes), computed in fp16
as the Core ML low-bit artifacts are, except RMSNorm's statistics (fp32: `_fp16_except_norms`) (edgeq/llm/coreml_lowbit_decoder.py). Runner: validate/runners/coreml_decoder.py.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from edgeq.errors import ConversionError, UsageError

STATE_NAMES = ("k_cache", "v_cache")
INPUT_NAMES = ("input_ids", "cache_position", "causal_mask")
OUTPUT_NAME = "logits"
METADATA_KEY = "edgeq.decoder"  # the artifact's own record: layout, max_context (the runner checks it)
MIN_TARGET = "iOS18"  # ct.StateType and read_state / write_state are iOS18 ops


def cache_shape(config, max_context: int) -> tuple[int, int, int, int]:
    """[layers, max_context, kv_heads, head_dim] of a transformers config (GPT-2's n_head maps to num_attention_heads)."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return (config.num_hidden_layers, max_context, kv_heads, head_dim)


def _state_cache_class():
    """A transformers Cache over the module's state buffers (built lazily: transformers is a heavy import)."""
    import torch
    from transformers.cache_utils import Cache

    class _StateCache(Cache):
        def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor):
            super().__init__(layers=[])
            self.keys, self.values, self.positions = keys, values, positions

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            """Write [1, kv_heads, n, head_dim] at `positions` of layer `layer_idx`; return the layer's whole cache
            [1, kv_heads, max_context, head_dim] as float32 (the mask hides rows not written yet)."""
            layer = torch.full_like(self.positions, layer_idx)
            out = []
            for buffer, new in ((self.keys, key_states), (self.values, value_states)):
                # In float32, then the whole buffer stored: copy_ into a slice would guard n against max_context
                # (torch.export), and coremltools reads the fp16 state as fp32 under fp32 compute, so a scatter of
                # fp16 values into it would mix dtypes.
                updated = buffer.float().index_put((layer, self.positions), new[0].transpose(0, 1).float())
                buffer.copy_(updated)
                out.append(buffer[layer_idx].float().transpose(0, 1).unsqueeze(0))
            return out[0], out[1]

        def get_seq_length(self, layer_idx: int = 0) -> int:
            return 0  # unused: positions and the 4-D mask are given, so nothing asks the cache for its length

    return _StateCache


def stateful_module(hf_model, max_context: int):
    """The torch module Core ML converts: `hf_model` over cache buffers `k_cache` / `v_cache` (fp16)."""
    import torch

    cache_class = _state_cache_class()
    shape = cache_shape(hf_model.config, max_context)

    class StatefulDecoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = hf_model
            self.register_buffer("k_cache", torch.zeros(shape, dtype=torch.float16))
            self.register_buffer("v_cache", torch.zeros(shape, dtype=torch.float16))

        def forward(self, input_ids, cache_position, causal_mask):
            positions = cache_position.long()
            cache = cache_class(self.k_cache, self.v_cache, positions)
            out = self.model(input_ids=input_ids, position_ids=positions.unsqueeze(0), attention_mask=causal_mask,
                             past_key_values=cache, use_cache=True)
            return out.logits

    return StatefulDecoder().eval()


def export_decoder(hf_model, max_context: int, dest: Path, *, plan=None) -> Path:
    """Write `hf_model` (a transformers CausalLM) to `dest` (.mlpackage) as a stateful Core ML decoder with a KV
    cache of `max_context` positions. fp32 compute (weights exactly as given) without a plan; with a low-bit
    `plan` (int4/int3/int2-weight or palettes on the coreml profiles) its layers hold the plan's codes, fp16
    compute. Returns `dest`. The caller's model is not modified."""
    if max_context < 2:
        raise UsageError(f"max context {max_context}: a decoder needs at least 2 positions")
    dest = Path(dest)
    model = as_float32(copy.deepcopy(hf_model)).eval()
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and max_context > limit:
        raise UsageError(f"max context {max_context} exceeds the model's {limit} positions (max_position_embeddings)")
    notes = []
    if plan is not None:
        from edgeq.llm.coreml_lowbit_decoder import pack

        model, notes = pack(model, plan)
    program = _export(stateful_module(model, max_context), max_context)
    if plan is not None:
        from edgeq.llm.coreml_lowbit_decoder import name_weights

        name_weights(program)
    mlmodel = _convert(program, max_context, fp16=plan is not None)
    _finish(mlmodel, dest, max_context, plan, notes)
    return dest


def as_float32(model):
    """The model in float32. A GGUF checkpoint loads as float32 but is flagged quantized, and transformers then
    refuses `.float()`; it is only called where a parameter is not float32 already."""
    import torch

    if any(p.dtype != torch.float32 for p in model.parameters()):
        model = model.float()
    return model


def _export(module, max_context: int):
    import torch
    from torch.export import Dim

    from edgeq.converters.coreml_graph import fix_graph

    # Traced at n = 2 (n = 1 would be specialised as a constant); n ranges over 1 ..= max_context.
    n = 2
    example = (torch.zeros(1, n, dtype=torch.int32), torch.arange(n, dtype=torch.int32), torch.zeros(1, 1, n, max_context))
    rows = Dim("n", min=1, max=max_context)
    shapes = {"input_ids": {1: rows}, "cache_position": {0: rows}, "causal_mask": {2: rows}}
    try:
        with torch.no_grad():
            program = torch.export.export(module, example, dynamic_shapes=shapes, strict=False).run_decompositions({})
    except Exception as exc:
        raise ConversionError(f"torch.export failed on the stateful decoder ({type(module.model).__name__}): "
                              f"{str(exc).strip().splitlines()[0][:300]}") from exc
    fix_graph(program)
    return program


def _convert(program, max_context: int, fp16: bool):
    import coremltools as ct
    import numpy as np

    from edgeq.converters.coreml_frontend import register_corrections
    from edgeq.converters.tracing import quiet

    register_corrections()
    buffers = dict(program.named_buffers())
    states = [ct.StateType(ct.TensorType(shape=tuple(buffers[name].shape), dtype=np.float16), name=name) for name in STATE_NAMES]
    try:
        with quiet():
            return ct.convert(program, convert_to="mlprogram", states=states,
                              compute_precision=_fp16_except_norms(ct) if fp16 else ct.precision.FLOAT32,
                              minimum_deployment_target=getattr(ct.target, MIN_TARGET))
    except Exception as exc:
        raise ConversionError(f"coremltools could not convert the stateful decoder: {type(exc).__name__}: "
                              f"{str(exc).strip().splitlines()[0][:300]}") from exc


_NORM_OPS = frozenset({"pow", "reduce_mean", "rsqrt"})


def _fp16_except_norms(ct):
    """fp16 compute with RMSNorm's statistics in fp32: x^2 and its mean overflow fp16 (65504) once |x| > 256,
    and SmolLM2-135M's hidden states do (measured: inf, then NaN logits, with everything fp16). transformers
    upcasts the norm to float32 for the same reason."""

    def keep_fp16(op) -> bool:
        if op.op_type in _NORM_OPS:
            return False
        if op.op_type == "add":  # the mean of squares + eps, feeding rsqrt
            producers = [getattr(v, "op", None) for v in (op.x, op.y)]
            return not any(p is not None and p.op_type == "reduce_mean" for p in producers)
        return True

    return ct.transform.FP16ComputePrecision(op_selector=keep_fp16)


def _finish(mlmodel, dest: Path, max_context: int, plan, notes: list[str]) -> None:
    """Name the output `logits`, record the layout, save reproducibly."""
    import coremltools as ct

    from edgeq.converters.coreml import make_reproducible

    spec = mlmodel.get_spec()
    inputs = [i.name for i in spec.description.input]
    if inputs != list(INPUT_NAMES):
        raise ConversionError(f"the converted decoder takes inputs {inputs}; expected {list(INPUT_NAMES)}")
    (output,) = [o.name for o in spec.description.output]
    if output != OUTPUT_NAME:
        ct.utils.rename_feature(spec, output, OUTPUT_NAME)
    record = {"max_context": max_context, "cache_layout": "[layers, max_context, kv_heads, head_dim]",
              "states": list(STATE_NAMES), "inputs": list(INPUT_NAMES), "output": OUTPUT_NAME,
              "scheme": None if plan is None else str(plan.scheme), "notes": notes}
    spec.description.metadata.userDefined[METADATA_KEY] = json.dumps(record, sort_keys=True)
    if dest.exists():
        import shutil

        shutil.rmtree(dest)
    ct.models.MLModel(spec, weights_dir=mlmodel.weights_dir).save(str(dest))
    make_reproducible(dest)


def open_runner(path: Path, max_context: int):
    """The artifact as a StepRunner: Core ML with MLState on macOS, edgeq's MIL reference executor elsewhere."""
    from edgeq.validate.runners.coreml_decoder import open_decoder_runner

    return open_decoder_runner(Path(path), max_context)
