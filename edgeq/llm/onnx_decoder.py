"""A Hugging Face causal LM as one ONNX graph for prefill and decode, in ONNX Runtime GenAI's layout.

    inputs   input_ids int64 [batch, sequence], attention_mask int64 [batch, total_sequence] (past + sequence),
             position_ids int64 [batch, sequence],
             past_key_values.{i}.key / .value  float32 [batch, kv_heads, past_sequence, head_dim]
    outputs  logits float32 [batch, sequence, vocab],
             present.{i}.key / .value  float32 [batch, kv_heads, past_sequence + sequence, head_dim]

This is what onnxruntime-genai's model builder writes for decoder-only models (its genai_config.json names
these inputs and outputs; written beside the graph by `write_genai_config`). Prefill is the call with an empty
past (past_sequence 0), decode the call with sequence 1: one graph, the past length dynamic up to max_context.

Route, measured: `torch.onnx.export(dynamo=True)` on a wrapper that rebuilds a transformers DynamicCache from
the flat past inputs and returns the cache's tensors as presents. The HF module runs unchanged (GQA with the
cache at kv_heads, rotary and partial rotary, tied embeddings, GPT-2's Conv1D). torch.export takes the empty
past (Dim min 0) when the example past is non-empty (a length-0 example would be specialized). Tiny Llama: the
graph's logits equal PyTorch's to ~3e-6 at prefill and along a decode (tests/llm/test_onnx_decoder.py).

4-bit: with a low-bit plan (edgeq/llm/onnx_lowbit_decoder.py) the planned linears export as the plan's
dequantized floats and converters/onnx_lowbit.py rewrites them into MatMulNBits with the plan's codes.

int8 KV cache: with a KVCachePlan (edgeq/llm/kv_cache.py) the wrapper is `int8_decoder_module`: past and present
are int8 codes under the same names and shapes; inside, the past is dequantized (Cast, Mul by the per-channel
scale constants), the new keys/values quantized (Div, Round, Clip, Cast) and appended to the past codes.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from edgeq.errors import ConversionError, UsageError

OPSET = 18
EXAMPLE_PAST, EXAMPLE_SEQUENCE = 4, 3  # any lengths >= 2 (torch.export specializes 0 and 1)


def input_names(layers: int) -> list[str]:
    return ["input_ids", "attention_mask", "position_ids"] + [
        f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def output_names(layers: int) -> list[str]:
    return ["logits"] + [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]


def cache_shape(config) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of a transformers decoder config."""
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not (layers and heads and hidden):
        raise ConversionError(f"{type(config).__name__}: cannot read layers, heads and hidden size for a KV cache")
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    return int(layers), int(kv_heads), int(head_dim)


def check_decoder(model, max_context: int) -> None:
    """Refuse what this export cannot take: encoder-decoders, non-causal LMs, a context beyond the positions."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "generation_config") and not hasattr(model, "lm_head"):
        raise ConversionError(f"{type(model).__name__} is not a transformers causal LM (no config / LM head)")
    if getattr(config, "is_encoder_decoder", False):
        raise ConversionError(f"{type(model).__name__} is an encoder-decoder; the decoder export takes decoder-only causal LMs")
    if max_context < 2:
        raise UsageError(f"max context {max_context}: a decoder needs at least 2 positions")
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and max_context > positions:
        raise UsageError(f"max context {max_context} exceeds the model's {positions} positions")


def decoder_module(hf_model):
    """The export wrapper: (input_ids, attention_mask, position_ids, *past) -> (logits, *present)."""
    import torch
    from transformers import DynamicCache

    layers = cache_shape(hf_model.config)[0]

    class DecoderWithPast(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner = model  # "inner." is the prefix converters/onnx_lowbit.py strips from layer names

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(layers)],
                                 config=self.inner.config)
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return DecoderWithPast(hf_model).eval()


def export_decoder(hf_model, max_context: int, dest: Path, *, plan=None, precision=None, kv_cache=None) -> Path:
    """`export_with_notes` without the notes: the per-runtime function the pipeline dispatches to."""
    return export_with_notes(hf_model, max_context, dest, plan=plan, precision=precision, kv_cache=kv_cache)[0]


def export_with_notes(hf_model, max_context: int, dest: Path, *, plan=None, precision=None,
                      kv_cache=None) -> tuple[Path, list[str]]:
    """Write `hf_model` (a transformers CausalLM) to `dest` (.onnx) as one prefill/decode graph with a KV cache
    of up to `max_context` positions, and genai_config.json beside it. With `plan` (a low-bit QuantPlan) its
    linear layers become MatMulNBits holding the plan's codes; `precision` (default int4-weight) sets the
    kernel's accuracy level. With `kv_cache` (a kv_cache.KVCachePlan) the cache is int8 and its scales are
    written beside the graph too. Returns (`dest`, the manifest's notes); the caller's model is not modified."""
    import onnx
    import torch

    from edgeq.converters.onnx import _reuse_torchlib_ops, name_outputs, portable_metadata
    from edgeq.converters.tracing import quiet

    check_decoder(hf_model, max_context)
    model = torch.nn.Module.float(copy.deepcopy(hf_model)).eval()  # GGUF models refuse their own .float()
    layers, kv_heads, head_dim = cache_shape(model.config)
    lowbit = {}
    if plan is not None:
        from edgeq.llm.onnx_lowbit_decoder import prepare_lowbit

        model, lowbit = prepare_lowbit(model, plan)
    if kv_cache is None:
        module, cache_dtype = decoder_module(model), torch.float32
    else:
        from edgeq.llm.kv_cache import int8_decoder_module

        module, cache_dtype = int8_decoder_module(model, kv_cache), torch.int8
    past = [torch.zeros(1, kv_heads, EXAMPLE_PAST, head_dim, dtype=cache_dtype) for _ in range(2 * layers)]
    total = EXAMPLE_PAST + EXAMPLE_SEQUENCE
    examples = (torch.zeros(1, EXAMPLE_SEQUENCE, dtype=torch.long), torch.ones(1, total, dtype=torch.long),
                torch.arange(EXAMPLE_PAST, total).unsqueeze(0), *past)
    Dim = torch.export.Dim
    sequence = Dim("sequence", min=1, max=max_context)
    past_sequence = Dim("past_sequence", min=0, max=max_context - 1)
    total_sequence = Dim("total_sequence", min=1, max=max_context)
    dynamic = ({1: sequence}, {1: total_sequence}, {1: sequence}, tuple({2: past_sequence} for _ in past))
    _reuse_torchlib_ops()
    try:
        with quiet(), torch.no_grad():
            program = torch.onnx.export(module, examples, dynamo=True, opset_version=OPSET,
                                        input_names=input_names(layers), dynamic_shapes=dynamic, verbose=False)
    except Exception as exc:  # the exporter's own message says which op or guard failed
        raise ConversionError(f"ONNX decoder export of {type(hf_model).__name__} failed: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
    proto = name_outputs(program.model_proto, output_names(layers))
    notes = []
    if lowbit:
        from edgeq.converters.onnx_lowbit import lower_lowbit
        from edgeq.targets import Precision

        notes = lower_lowbit(proto, lowbit, precision or Precision.INT4_WEIGHT, "onnx decoder")
        notes += eight_bit_at_level_4(proto)
    portable_metadata(proto)
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as exc:
        raise ConversionError(f"the exported ONNX decoder is invalid: {exc}") from exc
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(proto, str(dest))
    write_genai_config(hf_model, max_context, dest)
    if kv_cache is not None:
        from edgeq.llm.kv_cache import GENAI_NOTE, SCALES_FILE

        kv_cache.save(dest.with_name(SCALES_FILE))
        notes = [*notes, GENAI_NOTE]
    return dest, notes


def eight_bit_at_level_4(proto) -> list[str]:
    """8-bit MatMulNBits (an int8 LM head, the text-generation default) at accuracy_level 4, with its note.

    ORT 1.32 has no fast fp32-math 8-bit kernel: SmolLM2's 576 x 49152 head took 132-165 ms a call at level 1
    (the weight dequantized every call), 2.7-3.0 ms at level 4 (int8 activations per block), fp32 MatMul 6.7 ms,
    4-bit g32 at level 1 2.3 ms (one thread, this machine); at level 1 the int4 decoder decoded 4x slower than fp32."""
    from edgeq.converters.onnx_lowbit import set_accuracy_level

    changed = []
    for node in proto.graph.node:
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "MatMulNBits" and "bits" in attrs and attrs["bits"].i == 8 and \
                ("accuracy_level" not in attrs or attrs["accuracy_level"].i < 4):
            set_accuracy_level(node, 4)
            changed.append(node.name)
    if not changed:
        return []
    return [f"{len(changed)} 8-bit MatMulNBits (int8 weights, e.g. the LM head) run at accuracy_level 4: their input "
            f"quantized to int8 per block at run time (ORT has no fast fp32-math 8-bit kernel: 40-60x slower at level 1)"]


def open_runner(path: Path, max_context: int, threads: int = 1):
    """The StepRunner of a decoder .onnx (onnxruntime, CPU; `threads` intra-op threads, 0 = ORT's default)."""
    from edgeq.validate.runners.onnx_decoder import OnnxDecoderRunner

    return OnnxDecoderRunner(Path(path), max_context, threads=threads)


def write_genai_config(hf_model, max_context: int, dest: Path) -> Path:
    """genai_config.json beside `dest`, in the form onnxruntime-genai's model builder writes for decoders."""
    config = hf_model.config
    layers, kv_heads, head_dim = cache_shape(config)
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    eos = getattr(hf_model.generation_config, "eos_token_id", None) or getattr(config, "eos_token_id", None)
    genai = {
        "model": {
            "type": config.model_type,
            "context_length": max_context,
            "vocab_size": config.vocab_size,
            "bos_token_id": getattr(config, "bos_token_id", None) or 0,
            "eos_token_id": eos if eos is not None else 0,
            "pad_token_id": getattr(config, "pad_token_id", None) or (eos[0] if isinstance(eos, list) else eos) or 0,
            "decoder": {
                "filename": Path(dest).name,
                "head_size": head_dim, "hidden_size": hidden, "num_attention_heads": heads,
                "num_key_value_heads": kv_heads, "num_hidden_layers": layers,
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
            },
        },
        "search": {"do_sample": False, "max_length": max_context, "min_length": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0, "early_stopping": True, "length_penalty": 1.0,
                   "no_repeat_ngram_size": 0, "diversity_penalty": 0.0},
    }
    path = Path(dest).with_name("genai_config.json")
    path.write_text(json.dumps(genai, indent=2) + "\n")
    return path
