"""int8 KV cache for decoders: scales decided in PyTorch from calibration text, one arithmetic for the
PyTorch simulation and the exported graph.

Granularity: one symmetric int8 scale per (layer, key|value, kv_head, head_dim channel), static. Channels
differ in range (SmolLM2-135M: a head's largest key channel is 3-6x its median one, values up to 5.6x): a
per-channel scale keeps the small channels' resolution that one scale per head would spend on the largest.
Static scales, constants of the graph: the cache's I/O stays codes only (ORT GenAI's layout, its generate loop
runs it) and an entry written at step t is read unchanged at every later step. The price, measured on SmolLM2
(20 STS-B sentences, 20 chat prompts, FP32 weights): teacher-forced agreement 0.96 against 0.99 for dynamic
per-token scales, which would need a scale tensor beside every cache entry.

Semantics (llama.cpp's q8 cache): keys and values are quantized as they are written, and attention reads
the dequantized cache, the chunk just written included. So a prefill of a whole sequence already attends
through the int8 cache (teacher-forced figures measure the cache, not only the decode), and an entry once
written passes through every later step bit-exactly: present = concat(past codes, quantize(new)), the past
codes are never requantized.

`int8_decoder_module` is the one wrapper: torch.onnx.export traces it (edgeq/llm/onnx_decoder.py) and
`Int8CacheTorchRunner` runs it eagerly as the PyTorch simulation, so graph and simulation differ by float
rounding only (a code may move by one step where a value sits on a rounding boundary).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np

from edgeq.errors import UsageError
from edgeq.llm.steps import check_prefill_ids

QMAX = 127  # symmetric: -127..127, so negating a code never overflows and zero is exact
# Calibration sees a few hundred tokens; validation and real prompts bring values past its absmax (rotary keys at
# positions beyond the calibration lengths, rare tokens). A clipped outlier channel is an unbounded relative error
# on the channel that dominates the attention logits; 10% headroom costs 10% coarser rounding, bounded at half a step.
HEADROOM = 1.1
SCALE_FLOOR = 1e-8  # a channel that is zero in every calibration token: any finite scale keeps its codes 0
SCALES_FILE = "kv_scales.npz"
# Checked: onnxruntime-genai 0.18 allocates its past buffers with the graph's input dtype and carries the int8
# presents (tests/llm/test_onnx_kv_int8.py runs its generate loop against the PyTorch simulation).
GENAI_NOTE = ("int8 KV cache: genai_config.json written; onnxruntime-genai 0.18's generate loop runs this graph "
              "(int8 past/present carried as the graph declares them; the scales are graph constants)")


class KVCacheDtype(StrEnum):
    FLOAT = "float"   # the model's own float32 cache
    INT8 = "int8"


# Why a runtime cannot take the int8 cache yet (refused before any work, exit 2).
NOT_YET = {
    "tflite": "litert-torch's LiteRTLMCache holds float caches written by DYNAMIC_UPDATE_SLICE; an int8 cache "
              "needs its own cache class and the quantize/dequantize around it in the prefill and decode signatures",
    "coreml": "the Core ML decoder's KV cache is fp16 MLState updated in place (iOS18 state types); int8 state "
              "and its dequantization inside the stateful program are not built",
}


def check_runtimes(kv_cache: str, runtimes) -> KVCacheDtype:
    """The --kv-cache choice as a KVCacheDtype, refused (UsageError) where a requested runtime cannot take it."""
    try:
        dtype = KVCacheDtype(kv_cache)
    except ValueError:
        raise UsageError(f"--kv-cache {kv_cache}: takes {', '.join(d.value for d in KVCacheDtype)}") from None
    if dtype == KVCacheDtype.INT8:
        for runtime in runtimes:
            if runtime in NOT_YET:
                raise UsageError(f"--kv-cache int8 -t {runtime}: not yet ({NOT_YET[runtime]}); the int8 KV cache "
                                 "exports to onnx")
    return dtype


def prepare(model, max_context: int, reference, calibration, sequences, prompts, steps: int, echo=print, *,
            tokenizer=None):
    """(plan, the manifest's kv_cache block) for an int8 cache: scales from `calibration`, and the cache's own
    drift (FP32 weights, PyTorch simulation) against `reference` on the validation data, computed once per run
    and shared by every precision, since it does not depend on the weights' quantization."""
    from edgeq.llm.onnx_decoder import cache_shape

    streams = calibration_sequences(calibration, tokenizer, max_context)
    echo(f"int8 KV cache: scales per channel from {len(calibration)} calibration sequences "
         f"({'as text and chat turns, ' if len(streams) and tokenizer is not None and getattr(tokenizer, 'chat_template', None) else ''}"
         f"packed into {len(streams)} of up to {max_context} tokens)")
    plan = calibrate(model, streams)
    echo(f"int8 KV cache: its own drift (FP32 weights, PyTorch simulation) on {len(sequences)} sequences")
    drift = cache_drift(reference, model, plan, max_context, sequences, prompts, steps)
    float_bytes, int8_bytes = (cache_bytes(model.config, max_context, d) for d in (KVCacheDtype.FLOAT, KVCacheDtype.INT8))
    layers, kv_heads, head_dim = cache_shape(model.config)
    block = {**plan.to_manifest(), "cache_bytes_at_max_context": {"float32": float_bytes, "int8": int8_bytes},
             "scale_bytes": 2 * layers * kv_heads * head_dim * 4, "cache_only_drift": drift}
    echo(f"int8 KV cache alone: {summary(drift)}; cache {int8_bytes / 2**20:.2f} MiB at {max_context} tokens "
         f"(float32 {float_bytes / 2**20:.2f} MiB)")
    return plan, block


def summary(drift: dict) -> str:
    """One line of the cache-only figures (terminal and report)."""
    return (f"token agreement {drift['token_agreement']:.4f}, ppl delta {drift['ppl_delta']:+.4g}, greedy "
            f"{drift['greedy_agreement']:.3f}, logit cosine min {drift['logit_cosine_min']:.5f}")


@dataclass
class KVCachePlan:
    """Per-channel int8 scales: key_scales / value_scales float32 [layers, kv_heads, head_dim]."""

    key_scales: np.ndarray
    value_scales: np.ndarray
    headroom: float
    sequences: int          # calibration sequences the absmax was taken over
    tokens: int             # their tokens

    @property
    def layers(self) -> int:
        return int(self.key_scales.shape[0])

    def save(self, path: Path) -> Path:
        path = Path(path)
        np.savez(path, key_scales=self.key_scales, value_scales=self.value_scales)
        return path

    def to_manifest(self, scales_file: str = SCALES_FILE) -> dict:
        """The manifest's `kv_cache` block (the scales themselves in `scales_file` beside the artifact)."""
        layers, kv_heads, head_dim = self.key_scales.shape
        return {"dtype": "int8", "symmetric": True, "qmax": QMAX,
                "granularity": "per (layer, key/value, kv_head, head_dim channel), static",
                "shape": [int(layers), 2, int(kv_heads), int(head_dim)], "scales_file": scales_file,
                "computed": (f"absmax per channel of the FP32 model's keys (after rotary) and values over "
                             f"{self.tokens} calibration tokens in {self.sequences} sequences (the calibration "
                             f"texts, and as chat turns for a chat model, packed to the max context), "
                             f"x{self.headroom:g} headroom, / {QMAX}"),
                "semantics": "quantized on write; attention reads the dequantized cache, the new entries included; "
                             "stored codes pass through later steps unchanged"}


def calibrate(hf_model, calibration, *, headroom: float = HEADROOM) -> KVCachePlan:
    """Run the FP32 model over each calibration sequence (int64 [n]) and take every cache channel's absmax."""
    import torch

    from edgeq.llm.onnx_decoder import cache_shape

    layers, kv_heads, head_dim = cache_shape(hf_model.config)
    model = torch.nn.Module.float(hf_model).eval()
    absmax = np.zeros((2, layers, kv_heads, head_dim), np.float32)
    tokens = 0
    sequences = [np.asarray(s, np.int64) for s in calibration if len(s)]
    if not sequences:
        raise UsageError("the int8 KV cache needs calibration text: give --calibration-samples 1 or more")
    with torch.no_grad():
        for seq in sequences:
            out = model(input_ids=torch.from_numpy(seq)[None], use_cache=True)
            for i, layer in enumerate(out.past_key_values.layers):
                for kv, states in enumerate((layer.keys, layer.values)):  # [1, kv_heads, n, head_dim]
                    absmax[kv, i] = np.maximum(absmax[kv, i], states.abs().amax(dim=(0, 2)).float().numpy())
            tokens += seq.size
    scales = np.maximum(absmax * headroom, SCALE_FLOOR) / QMAX
    return KVCachePlan(scales[0].astype(np.float32), scales[1].astype(np.float32), headroom, len(sequences), tokens)


def calibration_sequences(calibration, tokenizer, max_context: int) -> list[np.ndarray]:
    """The token streams the cache's scales are taken over: the calibration texts as given and, for a chat model,
    as user turns too, packed back to back into sequences of `max_context` tokens.

    Why: static scales must cover what the cache will hold. Measured on SmolLM2-135M with STS-B sentences (about
    12 tokens each) as given: a chat prompt's keys and values reached 2-3.8x the calibration absmax in every
    layer (the template's special tokens and system turn; rotary keys at positions the short sentences never
    reach), and greedy agreement fell to 0.17. Packed to the max context, every rotary position is seen."""
    streams = [np.asarray(s, np.int64) for s in calibration if len(s)]
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        for ids in list(streams):
            text = tokenizer.decode(ids, skip_special_tokens=True)
            streams.append(np.asarray(tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                return_dict=True)["input_ids"], np.int64))
    if not streams:
        return []
    packed = np.concatenate(streams)
    return [packed[i:i + max_context] for i in range(0, packed.size, max_context) if packed[i:i + max_context].size >= 2]


def cache_bytes(config, max_context: int, dtype: KVCacheDtype) -> int:
    """Bytes of the KV cache at `max_context` positions, batch 1 (int8: the codes; scales are graph constants)."""
    from edgeq.llm.onnx_decoder import cache_shape

    layers, kv_heads, head_dim = cache_shape(config)
    return 2 * layers * kv_heads * head_dim * max_context * (1 if dtype == KVCacheDtype.INT8 else 4)


def _quantize(states, scale):
    import torch

    return torch.clamp(torch.round(states / scale), -QMAX, QMAX).to(torch.int8)


def _dequantize(codes, scale):
    import torch

    return codes.to(torch.float32) * scale


def _int8_layer_class():
    """A transformers cache layer holding int8 codes beside their dequantized floats (built lazily: torch)."""
    from transformers.cache_utils import DynamicLayer

    class Int8CacheLayer(DynamicLayer):
        def __init__(self, key_codes, value_codes, key_scale, value_scale):
            super().__init__()
            self.key_codes, self.value_codes = key_codes, value_codes
            self.key_scale, self.value_scale = key_scale, value_scale
            self.keys, self.values = _dequantize(key_codes, key_scale), _dequantize(value_codes, value_scale)
            self.dtype, self.device, self.is_initialized = self.keys.dtype, self.keys.device, True

        def update(self, key_states, value_states, *args, **kwargs):
            import torch

            new_keys, new_values = _quantize(key_states, self.key_scale), _quantize(value_states, self.value_scale)
            self.key_codes = torch.cat([self.key_codes, new_keys], dim=-2)  # the past codes, untouched
            self.value_codes = torch.cat([self.value_codes, new_values], dim=-2)
            # attention reads the cache as it is stored: the new entries dequantized from their codes too
            self.keys = torch.cat([self.keys, _dequantize(new_keys, self.key_scale)], dim=-2)
            self.values = torch.cat([self.values, _dequantize(new_values, self.value_scale)], dim=-2)
            return self.keys, self.values

    return Int8CacheLayer


def int8_decoder_module(hf_model, plan: KVCachePlan):
    """The export wrapper of onnx_decoder.decoder_module with an int8 cache:
    (input_ids, attention_mask, position_ids, *past int8) -> (logits, *present int8)."""
    import torch
    from transformers.cache_utils import Cache

    from edgeq.llm.onnx_decoder import cache_shape

    layers = cache_shape(hf_model.config)[0]
    if plan.layers != layers:
        raise UsageError(f"the KV cache plan has {plan.layers} layers, the model {layers}")
    layer_class = _int8_layer_class()

    class DecoderWithInt8Past(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.inner = model  # "inner." is the prefix converters/onnx_lowbit.py strips from layer names
            # [layers, kv_heads, head_dim] -> broadcast over [batch, kv_heads, sequence, head_dim]
            self.register_buffer("key_scales", torch.from_numpy(plan.key_scales)[:, None, :, None, :].clone())
            self.register_buffer("value_scales", torch.from_numpy(plan.value_scales)[:, None, :, None, :].clone())

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = Cache(layers=[layer_class(past[2 * i], past[2 * i + 1], self.key_scales[i], self.value_scales[i])
                                  for i in range(layers)])
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = []
            for layer in cache.layers:
                present += [layer.key_codes, layer.value_codes]
            return (out.logits, *present)

    return DecoderWithInt8Past(hf_model).eval()


class Int8CacheTorchRunner:
    """The PyTorch simulation of the int8 cache as a StepRunner: the FP32 model through `int8_decoder_module`,
    the int8 codes carried between calls as the ONNX runner carries its presents."""

    name = "pytorch-int8-kv"

    def __init__(self, hf_model, plan: KVCachePlan, max_context: int):
        import torch

        from edgeq.llm.onnx_decoder import cache_shape

        self.module = int8_decoder_module(torch.nn.Module.float(hf_model).eval(), plan)
        layers, kv_heads, head_dim = cache_shape(hf_model.config)
        self._empty = [torch.zeros(1, kv_heads, 0, head_dim, dtype=torch.int8)] * (2 * layers)
        self.max_context = int(max_context)
        self.reset()

    def reset(self) -> None:
        self.past = list(self._empty)
        self._position = 0

    @property
    def position(self) -> int:
        return self._position

    def prefill(self, token_ids: np.ndarray) -> np.ndarray:
        return self._forward(check_prefill_ids(token_ids, self._position, self.max_context))

    def decode(self, token_id: int) -> np.ndarray:
        return self._forward(check_prefill_ids(np.array([int(token_id)]), self._position, self.max_context))[0]

    def _forward(self, ids: np.ndarray) -> np.ndarray:
        import torch

        n = ids.size
        with torch.no_grad():
            logits, *self.past = self.module(
                torch.from_numpy(ids)[None], torch.ones(1, self._position + n, dtype=torch.long),
                torch.arange(self._position, self._position + n)[None], *self.past)
        self._position += n
        return logits[0].float().numpy()


def cache_drift(reference, hf_model, plan: KVCachePlan, max_context: int, sequences, prompts, steps: int) -> dict:
    """The int8 cache's own drift: FP32 weights with the int8 cache (PyTorch simulation) against `reference`
    (FP32 PyTorch), the same figures as an artifact's, so weight quantization does not enter them."""
    from edgeq.validate import generation

    report = generation.compare(reference, Int8CacheTorchRunner(hf_model, plan, max_context), sequences, prompts,
                                steps, continuations=False)
    tf = report.teacher_forced
    return {"compared": "FP32 weights + int8 KV cache (PyTorch simulation) vs FP32 PyTorch",
            **report.metrics(), "logit_cosine_mean": tf.logit_cosine_mean,
            "full_greedy_matches": report.greedy.full_matches, "prompts": len(report.greedy.prompts)}

