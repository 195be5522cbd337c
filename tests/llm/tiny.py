"""Tiny random-weight decoders built from configs, seeded, float32, eval mode (issue 14 tests).

Each builder covers one family's export-relevant traits: Llama (grouped-query attention, rotary
embeddings, tied embeddings), Qwen2 (GQA with q/k/v biases), GPT-2 (learned positions, Conv1D
projections, fused qkv), Phi (partial rotary, parallel attention + MLP, LM head bias). Hidden 64, two
layers, vocabulary 256, so an export and a few dozen decode steps take seconds.
"""

from __future__ import annotations

VOCAB = 256
MAX_POSITIONS = 128  # room for the tests' max_context (<= 64) with margin


def _finish(model, seed: int):
    """Re-draw every weight from `seed` with a std wide enough that the logits are not flat.

    HF's init (std 0.02) gives near-uniform logits in a 2-layer model: top-1 would be decided by noise
    and agreement tests would measure nothing.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.15)
            elif "norm" in name or "ln" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.float().eval()


def tiny_llama(seed: int = 0, *, tie: bool = True):
    """LlamaForCausalLM: 4 heads / 2 KV heads (GQA), rope, tied input and output embeddings."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                      rope_theta=10000.0, tie_word_embeddings=tie, attn_implementation="eager")
    return _finish(LlamaForCausalLM(cfg), seed)


def tiny_qwen2(seed: int = 0):
    """Qwen2ForCausalLM: GQA 4/2, q/k/v with biases, untied LM head."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS,
                      tie_word_embeddings=False, use_sliding_window=False, attn_implementation="eager")
    return _finish(Qwen2ForCausalLM(cfg), seed)


def tiny_gpt2(seed: int = 0):
    """GPT2LMHeadModel: learned positions, Conv1D projections, fused qkv, tied embeddings."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=MAX_POSITIONS,
                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return _finish(GPT2LMHeadModel(cfg), seed)


def tiny_phi(seed: int = 0):
    """PhiForCausalLM: partial rotary (half the head dim), parallel attention and MLP, LM head bias."""
    from transformers import PhiConfig, PhiForCausalLM

    cfg = PhiConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5,
                    max_position_embeddings=MAX_POSITIONS, attn_implementation="eager")
    return _finish(PhiForCausalLM(cfg), seed)


BUILDERS = {"llama": tiny_llama, "qwen2": tiny_qwen2, "gpt2": tiny_gpt2, "phi": tiny_phi}


def tiny_decoder(family: str, seed: int = 0):
    """The tiny decoder of `family` (one of BUILDERS)."""
    return BUILDERS[family](seed)


def token_sequences(count: int = 4, length: int = 24, seed: int = 0):
    """`count` int64 numpy arrays of random token ids in [0, VOCAB), seeded."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, VOCAB, size=length, dtype=np.int64) for _ in range(count)]


def save_folder(model, folder):
    """`model` saved as a Hugging Face folder with a word-level tokenizer over its VOCAB ids ("w0".."w255";
    words outside it read as id 0), so text data and chat-free prompts go through a real tokenizer."""
    from pathlib import Path

    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    folder = Path(folder)
    model.save_pretrained(str(folder))
    vocab = {f"w{i}": i for i in range(VOCAB)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="w0").save_pretrained(str(folder))
    return folder


def word_texts(count: int, length: int = 12, seed: int = 0) -> list[str]:
    """`count` lines of `length` in-vocabulary words, seeded (text data for save_folder's tokenizer)."""
    return [" ".join(f"w{t}" for t in ids) for ids in token_sequences(count, length, seed)]
