"""Zoo: Hugging Face architectures from small configs with random weights (transformers is a dev dependency;
nothing is downloaded). Each factory returns (wrapper returning named tensors, example inputs by name), as a
`tests.zoo.huggingface:NAME` callable source. Width 32, 1 layer, 2 heads, 8 tokens, 32x32 images."""

from __future__ import annotations

import torch
from torch import nn

from tests.zoo.seeding import seeded

TOKENS, VOCAB = 8, 96


class Output(nn.Module):
    """Keep one field of a ModelOutput (`last_hidden_state`, `logits`, ...) under its own name."""

    def __init__(self, model: nn.Module, field: str):
        super().__init__()
        self.model, self.field = model, field

    def forward(self, **inputs):
        return {self.field: getattr(self.model(**inputs), self.field)}


def _text_inputs(with_mask=True):
    ids = torch.randint(3, VOCAB, (1, TOKENS), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)} if with_mask else {"input_ids": ids}


def _build(model_cls, config, field):
    config._attn_implementation = "eager"  # the attention every exporter takes; sdpa's mask path varies by version
    return seeded(lambda: Output(model_cls(config), field))


TEXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            max_position_embeddings=32)


def bert():
    from transformers import BertConfig, BertModel

    return _build(BertModel, BertConfig(**TEXT, add_pooling_layer=False), "last_hidden_state"), _text_inputs()


def distilbert():
    from transformers import DistilBertConfig, DistilBertModel

    config = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=64, max_position_embeddings=32)
    return _build(DistilBertModel, config, "last_hidden_state"), _text_inputs()


def roberta():
    from transformers import RobertaConfig, RobertaModel

    config = RobertaConfig(**TEXT, pad_token_id=1)
    return _build(RobertaModel, config, "last_hidden_state"), _text_inputs()


def _pixels(size=32):
    return {"pixel_values": torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))}


def hf_vit():
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, num_labels=10)
    return _build(ViTForImageClassification, config, "logits"), _pixels()


class MobileViT(nn.Module):
    """MobileViT from transformers' own blocks, cut to one stage: a strided conv stem, then one MobileViT block
    (inverted-residual downsampling, local conv, unfold into patches, a transformer layer, fold, fusion conv),
    pooled and classified. The full MobileViTModel has nine transformer layers at any config (its depths are
    fixed), which costs minutes per conversion."""

    def __init__(self, classes=10):
        super().__init__()
        from transformers import MobileViTConfig
        from transformers.models.mobilevit.modeling_mobilevit import MobileViTConvLayer, MobileViTLayer

        config = MobileViTConfig(image_size=32, patch_size=2, num_attention_heads=2, mlp_ratio=2.0, expand_ratio=2.0)
        config._attn_implementation = "eager"
        self.stem = MobileViTConvLayer(config, 3, 16, kernel_size=3, stride=2)
        self.block = MobileViTLayer(config, 16, 24, stride=2, hidden_size=32, num_stages=1)
        self.classifier = nn.Linear(24, classes)

    def forward(self, pixel_values):
        return {"logits": self.classifier(self.block(self.stem(pixel_values)).mean((2, 3)))}


def mobilevit():
    return seeded(MobileViT), _pixels()


def whisper_encoder():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    # The encoder's two convs halve 2 * max_source_positions mel frames to max_source_positions positions.
    config = WhisperConfig(num_mel_bins=16, d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                           max_source_positions=16, decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64)
    features = torch.randn(1, 16, 32, generator=torch.Generator().manual_seed(1))
    return _build(WhisperEncoder, config, "last_hidden_state"), {"input_features": features}


class FeatureEncoder(nn.Module):
    """Wav2Vec2's convolutional feature encoder (group-norm first layer, GELU), raw audio -> frames."""

    def __init__(self, config):
        super().__init__()
        from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2FeatureEncoder

        self.encoder = Wav2Vec2FeatureEncoder(config)

    def forward(self, input_values):
        return {"extract_features": self.encoder(input_values).transpose(1, 2)}


def wav2vec2_features():
    from transformers import Wav2Vec2Config

    config = Wav2Vec2Config(conv_dim=(16, 16, 16), conv_kernel=(10, 3, 3), conv_stride=(5, 2, 2), feat_extract_norm="group",
                            hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    audio = torch.randn(1, 400, generator=torch.Generator().manual_seed(1))
    return seeded(FeatureEncoder, config), {"input_values": audio}


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=2, use_cache=False,
                        bos_token_id=0, eos_token_id=0)
    return _build(GPT2LMHeadModel, config, "logits"), _text_inputs()


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**TEXT, num_key_value_heads=1, use_cache=False, tie_word_embeddings=False)
    return _build(LlamaForCausalLM, config, "logits"), _text_inputs()
