"""A Hugging Face causal LM as one `.tflite` with "prefill" and "decode" signatures and an external KV cache.

Route, and why: litert-torch 0.10 ships two generative paths. `litert_torch.generative.examples` re-author each
family in litert-torch's own layers and load checkpoints with per-family name maps (a few families, weights
re-mapped by hand); `litert_torch.generative.export_hf` (what LiteRT-LM's HF export uses) wraps the Hugging Face
model itself: its `LiteRTLMCache` (a transformers Cache whose update is a TFLite DYNAMIC_UPDATE_SLICE at
`input_pos`) and its "lrt_transposed_attention" attention function, registered in transformers'
AttentionInterface. edgeq uses the second: the HF module runs unchanged (its weights exactly, GQA, rotary
and partial rotary, tied embeddings, biases, GPT-2's Conv1D), so every family transformers can export with an
attention interface works, and the cache has the layout LiteRT-LM reads:

  kv_cache_k_{i}  float32 [1, kv_heads, S, head_dim]     (k_ts_idx 2)
  kv_cache_v_{i}  float32 [1, kv_heads, head_dim, S]     (v_ts_idx 3: values transposed, sequence last)

with S = max_context, and inputs `tokens` int32 [1, T], `input_pos` int32 [T], `mask` float32 [1, 1, T, S]
(additive: 0 visible, very negative hidden). Its top-level `export()` is not used: it imports TensorFlow (not
installed, for image-generation models) and writes LiteRT-LM's own bundle. Two differences from LiteRT-LM's
export, both for validation: the prefill signature returns logits for all T rows (LiteRT-LM's returns none or
the last one), and the signatures are named "prefill" and "decode" (LiteRT-LM: "prefill_{T}").

Prefill length: one fixed length, PREFILL_LENGTH (32) or max_context if smaller; the runner pads and chunks
(validate/runners/tflite_decoder.py). 4-bit weights: edgeq/llm/tflite_lowbit_decoder.py.
"""

from __future__ import annotations

import contextlib
import copy
import gc
from pathlib import Path

from edgeq.errors import ConversionError, UsageError

PREFILL_LENGTH = 32  # prompt rows per prefill call: long enough for chat prompts in a few calls, small for conversion


def prefill_length(max_context: int) -> int:
    return min(PREFILL_LENGTH, max_context)


def export_decoder(hf_model, max_context: int, dest: Path, *, plan=None) -> Path:
    """Write `hf_model` (a transformers CausalLM, float) to `dest` as a decoder .tflite with a KV cache of
    `max_context` positions; with `plan` (a low-bit QuantPlan, int4-dynamic on tflite) its linear layers hold the
    plan's codes and scales. Returns `dest`. The caller's model is not modified."""
    if max_context < 2:
        raise UsageError(f"max context {max_context}: a decoder needs at least 2 positions")
    import torch

    # nn.Module.float, not the HF override: transformers refuses .float() on a model loaded from a GGUF file
    # (flagged quantized), although its weights are already dequantized to float.
    model = torch.nn.Module.float(copy.deepcopy(hf_model)).eval()
    _check_model(model, max_context)
    quant_config = strict = owners = None
    if plan is not None:
        from edgeq.llm.tflite_lowbit_decoder import stand_in_model

        model, quant_config, owners = stand_in_model(model, plan)
        strict = True
    prefill, decode = signature_modules(model, max_context)
    flatbuffer = convert(prefill, decode, quant_config, strict)
    if plan is not None:
        from edgeq.llm.tflite_lowbit_decoder import pack_decoder

        flatbuffer = pack_decoder(flatbuffer, plan, owners)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_bytes(flatbuffer)
    return dest


def open_runner(path: Path, max_context: int, threads: int | None = None):
    """The StepRunner of a decoder .tflite (LiteRT, default CPU delegate; `threads` None: LiteRT's default)."""
    from edgeq.validate.runners.tflite_decoder import TFLiteDecoderRunner

    return TFLiteDecoderRunner(Path(path), max_context, threads)


def _check_model(model, max_context: int) -> None:
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        raise ConversionError(f"{type(model).__name__} is an encoder-decoder; the TFLite decoder export takes decoder-only causal LMs")
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions is not None and max_context > positions:
        raise UsageError(f"max context {max_context} exceeds the model's {positions} positions")
    rope = (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if "dynamic" in rope or "longrope" in rope:  # depend on the sequence length at run time: not a fixed graph
        raise ConversionError(f"rope type {rope!r}: the TFLite decoder export takes fixed rotary tables (default, linear, llama3)")
    window = getattr(config, "sliding_window", None)
    if window is not None and getattr(config, "use_sliding_window", True) and window < max_context and "sliding_attention" in (getattr(config, "layer_types", None) or []):
        raise ConversionError(f"sliding-window attention ({window} < max context {max_context}) is not exported; use --max-context {window}")


def signature_modules(model, max_context: int):
    """((prefill module, sample kwargs), (decode module, sample kwargs)) around `model`, litert-torch's
    export_hf modules with its LiteRTLMCache; `model` is switched to litert-torch's attention function."""
    import torch
    from litert_torch.generative.export_hf.core import exportable_module, exportable_module_config

    config = exportable_module_config.ExportableModuleConfig(
        model=getattr(model.config, "_name_or_path", "") or model.config.model_type, output_dir="", work_dir="",
        task="text_generation", prefill_lengths=[prefill_length(max_context)], cache_length=max_context,
        prefill_logits=True, extra_kwargs={},
    )

    class Prefill(exportable_module.LiteRTExportableModuleForDecoderOnlyLMPrefill):
        """litert-torch's prefill, returning the logits of every row (its own keeps the last at most)."""

        def forward(self, tokens, input_pos, kv_cache, mask):
            inputs = self.adapt_inputs(tokens, None, input_pos, kv_cache, mask) | self.attention_kwargs()
            inputs["prefill_logits"] = True
            output = self.model(**inputs)
            return {"kv_cache": output.past_key_values, "logits": output.logits.to(torch.float32)}

    try:
        model.set_attn_implementation("lrt_transposed_attention")
    except Exception as exc:  # a family without transformers' attention interface
        raise ConversionError(f"{type(model).__name__} cannot take litert-torch's attention function: {exc}") from exc
    prefill = Prefill(model, config).eval()
    decode = exportable_module.LiteRTExportableModuleForDecoderOnlyLMGenerate(model, config).eval()
    cache_config = copy.copy(model.config)  # the cache reads num_key_value_heads, which GPT-2's config lacks (MHA)
    if getattr(cache_config, "num_key_value_heads", None) is None:
        cache_config.num_key_value_heads = cache_config.num_attention_heads
    (_, (prefill_inputs, _)), = prefill.get_sample_inputs(cache_config).items()
    decode_inputs = decode.get_sample_inputs(cache_config)["decode"][0]
    return (prefill, prefill_inputs), (decode, decode_inputs)


def convert(prefill, decode, quant_config=None, strict: bool | None = None) -> bytes:
    """Both signatures converted into one flatbuffer (weights shared between them)."""
    import litert_torch

    from edgeq.converters.tflite import strict_qdq
    from edgeq.converters.tracing import quiet

    (prefill_module, prefill_inputs), (decode_module, decode_inputs) = prefill, decode
    try:
        with quiet(), _tuple_to(), strict_qdq(bool(strict)):
            edge = (litert_torch.signature("prefill", prefill_module, sample_kwargs=prefill_inputs)
                    .signature("decode", decode_module, sample_kwargs=decode_inputs)
                    .convert(strict_export=False, quant_config=quant_config))
            flatbuffer = bytes(edge.model_content())
    except ConversionError:
        raise
    except Exception as exc:
        raise ConversionError(f"litert-torch could not convert the decoder: {type(exc).__name__}: {exc}") from exc
    gc.collect()
    return flatbuffer


@contextlib.contextmanager
def _tuple_to():
    """litert-torch's export_hf patches `tuple.to` during conversion (export_lib.patch_builtin_tuple_for_export):
    transformers moves cache entries with `.to()`, and its cache update returns tuples. Same patch, same scope."""
    slots = gc.get_referents(tuple.__dict__)[0]
    had, original = "to" in slots, slots.get("to")
    slots["to"] = lambda self, *args, **kwargs: tuple(i.to(*args, **kwargs) if hasattr(i, "to") else i for i in self)
    try:
        yield
    finally:
        if had:
            slots["to"] = original
        else:
            del slots["to"]
