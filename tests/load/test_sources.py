"""Every model source `edgeq.load.load_model` accepts, each checked against the nn.Module it came from.

Each test builds a tiny seeded model in code, saves it the way users do, loads it back and asserts the
signature (input names, shapes, dtypes; output names), the source record, and that the loaded module
reproduces the original's output on the loaded example inputs.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import safetensors.torch
import torch

from edgeq.errors import SourceError, UsageError
from edgeq.examples import TinyMLP, tiny_convnet, tiny_mlp
from edgeq.load import LoadedModel, load_model
from edgeq.signature import parse_input_spec

from tests.load import factories

MLP_INPUT = "x:1x16:float32"


def signature_of(model: LoadedModel) -> list[tuple[str, tuple[int, ...], str]]:
    return [(spec.name, spec.shape, spec.dtype) for spec in model.inputs]


def assert_matches_examples(model: LoadedModel) -> None:
    """The declared signature describes the example tensors exactly."""
    assert len(model.example_inputs) == len(model.inputs)
    for spec, tensor in zip(model.inputs, model.example_inputs):
        assert tuple(tensor.shape) == spec.shape, spec.name
        assert str(tensor.dtype) == f"torch.{spec.dtype}", spec.name


def assert_file_digest(model: LoadedModel, path: Path) -> None:
    assert model.source.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def assert_state_digest(model: LoadedModel) -> None:
    assert len(model.source.sha256) == 64
    int(model.source.sha256, 16)  # hex


def run(model: LoadedModel) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model.module(*model.example_inputs)


def trained_mlp() -> TinyMLP:
    """tiny_mlp's model with weights that differ from the factory's seeded ones."""
    module, _ = tiny_mlp()
    with torch.no_grad():
        for tensor in module.state_dict().values():
            tensor.add_(1.0)
    return module.eval()


# --- package.module:callable ---------------------------------------------------------------------------


def test_callable_with_tuple_examples_tiny_mlp():
    original, (example,) = tiny_mlp()

    model = load_model("edgeq.examples:tiny_mlp")

    assert signature_of(model) == [("x", (1, 16), "float32")]
    assert model.outputs == ["output"]
    assert model.source.kind == "callable"
    assert model.source.location == "edgeq.examples:tiny_mlp"
    assert_state_digest(model)
    assert model.name == "tiny_mlp"
    torch.testing.assert_close(model.example_inputs[0], example)
    (out,) = run(model)
    torch.testing.assert_close(out, original(example))


def test_callable_with_tuple_examples_tiny_convnet_names_dict_outputs():
    original, (example,) = tiny_convnet()

    model = load_model("edgeq.examples:tiny_convnet")

    assert signature_of(model) == [("pixels", (1, 3, 32, 32), "float32")]
    assert model.outputs == ["logits"]
    assert model.source.kind == "callable"
    assert_state_digest(model)
    (out,) = run(model)
    torch.testing.assert_close(out, original(example)["logits"])


def test_callable_from_helper_module_with_tuple_examples():
    original, (example,) = factories.mlp_with_tuple()

    model = load_model("tests.load.factories:mlp_with_tuple")

    assert signature_of(model) == [("x", (1, 16), "float32")]
    assert model.outputs == ["output"]
    assert model.source.kind == "callable"
    assert_state_digest(model)
    (out,) = run(model)
    torch.testing.assert_close(out, original(example))


def test_callable_returning_module_alone_uses_declared_inputs():
    original = factories.mlp_alone()

    model = load_model("tests.load.factories:mlp_alone", inputs=[parse_input_spec(MLP_INPUT)])

    assert signature_of(model) == [("x", (1, 16), "float32")]
    assert model.outputs == ["output"]
    assert model.source.kind == "callable"
    assert_state_digest(model)
    assert_matches_examples(model)
    (out,) = run(model)
    torch.testing.assert_close(out, original(*model.example_inputs))


def test_callable_with_dict_examples_names_inputs_by_key():
    original, examples = factories.difference_with_dict()

    model = load_model("tests.load.factories:difference_with_dict")

    assert signature_of(model) == [("b", (1, 8), "float32"), ("a", (1, 8), "float32")]
    assert model.outputs == ["output"]
    assert model.source.kind == "callable"
    assert model.source.sha256  # a module without weights still gets a digest
    torch.testing.assert_close(model.example_inputs[0], examples["b"])
    torch.testing.assert_close(model.example_inputs[1], examples["a"])
    (out,) = run(model)
    torch.testing.assert_close(out, original(a=examples["a"], b=examples["b"]))


def test_callable_class_builds_module_with_declared_inputs():
    model = load_model("edgeq.examples:TinyMLP", inputs=[parse_input_spec(MLP_INPUT)])

    assert signature_of(model) == [("x", (1, 16), "float32")]
    assert model.outputs == ["output"]
    assert model.source.kind == "callable"
    assert model.name == "TinyMLP"
    assert_state_digest(model)
    # The class's weights are random: compare against the very module the loader built.
    (out,) = run(model)
    torch.testing.assert_close(out, model.module.inner(*model.example_inputs))
    assert isinstance(model.module.inner, TinyMLP)


def test_callable_without_examples_or_inputs_asks_for_input():
    with pytest.raises(UsageError, match="--input"):
        load_model("tests.load.factories:mlp_alone")


def test_callable_in_unknown_module_is_a_source_error():
    with pytest.raises(SourceError, match="no_such_package"):
        load_model("no_such_package.models:build")


def test_callable_with_unknown_attribute_is_a_source_error():
    with pytest.raises(SourceError, match="no_such_factory"):
        load_model("tests.load.factories:no_such_factory")


def test_callable_that_raises_is_a_source_error_naming_it():
    with pytest.raises(SourceError, match="tests.load.factories:broken") as info:
        load_model("tests.load.factories:broken")
    assert "factory exploded on purpose" in str(info.value)


def test_non_contiguous_examples_become_contiguous():
    original, (raw,) = factories.transposed_examples()
    assert not raw.is_contiguous()

    model = load_model("tests.load.factories:transposed_examples")

    assert signature_of(model) == [("x", (2, 16), "float32")]
    (example,) = model.example_inputs
    assert example.is_contiguous()
    torch.testing.assert_close(example, raw)
    (out,) = run(model)
    torch.testing.assert_close(out, original(raw))


# --- TorchScript -------------------------------------------------------------------------------------


@pytest.mark.parametrize("filename", ["m.pt", "m.ts"])
def test_torchscript_names_inputs_from_forward(tmp_path, filename):
    original, (example,) = tiny_mlp()
    path = tmp_path / filename
    torch.jit.trace(original, (example,)).save(str(path))

    model = load_model(str(path), inputs=[parse_input_spec(MLP_INPUT)])

    assert signature_of(model) == [("x", (1, 16), "float32")]
    assert model.outputs == ["output"]
    assert model.source.kind == "torchscript"
    assert model.name == "m"
    assert_file_digest(model, path)
    assert_matches_examples(model)
    (out,) = run(model)
    torch.testing.assert_close(out, original(*model.example_inputs))


def test_torchscript_without_inputs_asks_for_input(tmp_path):
    original, examples = tiny_mlp()
    path = tmp_path / "m.ts"
    torch.jit.trace(original, examples).save(str(path))

    with pytest.raises(UsageError, match="--input"):
        load_model(str(path))


# --- torch.export program ------------------------------------------------------------------------------


def test_export_program_carries_examples_and_names(tmp_path):
    original, examples = tiny_convnet()
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(original, examples), str(path))

    model = load_model(str(path))

    assert signature_of(model) == [("pixels", (1, 3, 32, 32), "float32")]
    assert model.outputs == ["logits"]
    assert model.source.kind == "export"
    assert model.name == "m"
    assert_file_digest(model, path)
    torch.testing.assert_close(model.example_inputs[0], examples[0])
    (out,) = run(model)
    torch.testing.assert_close(out, original(*examples)["logits"])


# --- Hugging Face folder -------------------------------------------------------------------------------

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "edge", "##q", "proves", "every", "artifact",
         "against", "the", "py", "##torch", "model", "it", "came", "from", "."]
BERT_SIZES = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37)
# Room for the loader's default 128-token example; the 64-position model has its own test below.
POSITIONS = 128


def save_tiny_bert(folder: Path, head=None, max_position_embeddings: int = POSITIONS, **config):
    """Save a seeded tiny BERT and a word-piece tokenizer into `folder`; return the model in eval mode."""
    import transformers

    folder.mkdir(parents=True)
    torch.manual_seed(0)
    head = head or transformers.BertModel
    model = head(
        transformers.BertConfig(**BERT_SIZES, max_position_embeddings=max_position_embeddings, **config)
    ).eval()
    model.save_pretrained(folder)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(VOCAB) + "\n")
    # transformers 5 ignores `vocab_file=`; `vocab=` takes the path (or a dict).
    transformers.BertTokenizerFast(vocab=str(vocab)).save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hf") / "tiny-bert"
    return folder, save_tiny_bert(folder)


@pytest.fixture(scope="module")
def classifier_folder(tmp_path_factory):
    import transformers

    folder = tmp_path_factory.mktemp("hf") / "tiny-bert-classifier"
    return folder, save_tiny_bert(folder, transformers.BertForSequenceClassification, num_labels=3)


TEXT_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def keyword_inputs(model: LoadedModel) -> dict[str, torch.Tensor]:
    return dict(zip(model.input_names, model.example_inputs))


@pytest.mark.parametrize("length", [1, 2])
def test_a_sequence_shorter_than_the_special_tokens_loads(bert_folder, length):
    """--input input_ids:1x1 (one-token latency): the tokenizer keeps [CLS] ... [SEP]; the example is cut to fit."""
    folder, _ = bert_folder
    specs = [parse_input_spec(f"{name}:1x{length}:int64") for name in TEXT_INPUTS]
    model = load_model(str(folder), task="feature-extraction", inputs=specs)
    assert signature_of(model) == [(name, (1, length), "int64") for name in TEXT_INPUTS]
    assert model.example_inputs[0][0, 0].item() == VOCAB.index("[CLS]")
    assert_matches_examples(model)
    from edgeq.calibration.data import tokenize

    samples = tokenize(["a sentence much longer than one token", "x"], model.inputs, model.tokenizer)
    assert [s["input_ids"].shape for s in samples] == [(1, length)] * 2 and samples[0]["input_ids"][0, 0] == VOCAB.index("[CLS]")


def test_huggingface_feature_extraction(bert_folder):
    folder, original = bert_folder

    model = load_model(str(folder), task="feature-extraction")

    assert signature_of(model) == [(name, (1, 128), "int64") for name in TEXT_INPUTS]
    assert model.outputs == ["last_hidden_state"]
    assert model.source.kind == "huggingface"
    assert model.task == "feature-extraction"
    assert model.tokenizer is not None
    assert model.name == "tiny-bert"
    assert len(model.source.sha256) == 64
    assert_matches_examples(model)
    # The tokenizer made the examples: [CLS] first, real word pieces, padding masked out.
    ids = model.example_inputs[0][0]
    assert ids[0].item() == VOCAB.index("[CLS]")
    assert VOCAB.index("proves") in ids.tolist()
    assert 0 < int(model.example_inputs[1].sum()) < 128
    (out,) = run(model)
    with torch.no_grad():
        expected = original(**keyword_inputs(model)).last_hidden_state
    torch.testing.assert_close(out, expected)


def test_huggingface_sentence_embedding_is_normalised_masked_mean(bert_folder):
    folder, original = bert_folder

    model = load_model(str(folder), task="sentence-embedding")

    assert signature_of(model) == [(name, (1, 128), "int64") for name in TEXT_INPUTS]
    assert model.outputs == ["sentence_embedding"]
    assert model.source.kind == "huggingface"
    (out,) = run(model)
    assert out.shape == (1, 32)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(1))
    inputs = keyword_inputs(model)
    with torch.no_grad():
        states = original(**inputs).last_hidden_state
    mask = inputs["attention_mask"].unsqueeze(-1).float()
    expected = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
    torch.testing.assert_close(out, expected)


def test_huggingface_text_classification(classifier_folder):
    folder, original = classifier_folder

    model = load_model(str(folder), task="text-classification")

    assert signature_of(model) == [(name, (1, 128), "int64") for name in TEXT_INPUTS]
    assert model.outputs == ["logits"]
    assert model.source.kind == "huggingface"
    assert model.name == "tiny-bert-classifier"
    (out,) = run(model)
    assert out.shape == (1, 3)
    with torch.no_grad():
        expected = original(**keyword_inputs(model)).logits
    torch.testing.assert_close(out, expected)


def test_huggingface_declared_input_sets_sequence_length(bert_folder):
    folder, original = bert_folder

    model = load_model(str(folder), task="feature-extraction", inputs=[parse_input_spec("input_ids:1x16:int64")])

    assert signature_of(model) == [(name, (1, 16), "int64") for name in TEXT_INPUTS]
    assert model.outputs == ["last_hidden_state"]
    assert_matches_examples(model)
    (out,) = run(model)
    assert out.shape == (1, 16, 32)
    with torch.no_grad():
        expected = original(**keyword_inputs(model)).last_hidden_state
    torch.testing.assert_close(out, expected)


def test_huggingface_default_length_fits_a_short_position_table(tmp_path):
    """A model with 64 positions cannot take the default 128-token example: the loader must fit the table."""
    folder = tmp_path / "short-bert"
    original = save_tiny_bert(folder, max_position_embeddings=64)

    model = load_model(str(folder), task="feature-extraction")

    assert signature_of(model) == [(name, (1, 64), "int64") for name in TEXT_INPUTS]
    (out,) = run(model)
    with torch.no_grad():
        expected = original(**keyword_inputs(model)).last_hidden_state
    torch.testing.assert_close(out, expected)


def test_huggingface_declared_dtype_reaches_the_examples(bert_folder):
    folder, _ = bert_folder

    model = load_model(str(folder), task="feature-extraction", inputs=[parse_input_spec("input_ids:1x16:int32")])

    assert signature_of(model)[0] == ("input_ids", (1, 16), "int32")
    assert_matches_examples(model)  # the example must be int32 too, or converters see another signature


def test_huggingface_declared_attention_mask_sets_sequence_length(bert_folder):
    folder, original = bert_folder

    model = load_model(
        str(folder), task="feature-extraction", inputs=[parse_input_spec("attention_mask:1x16:int64")]
    )

    assert signature_of(model) == [(name, (1, 16), "int64") for name in TEXT_INPUTS]
    (out,) = run(model)
    with torch.no_grad():
        expected = original(**keyword_inputs(model)).last_hidden_state
    torch.testing.assert_close(out, expected)


def test_huggingface_generic_folder_name_uses_parent(tmp_path):
    folder = tmp_path / "my-encoder" / "model"
    save_tiny_bert(folder)

    model = load_model(str(folder), task="feature-extraction", inputs=[parse_input_spec("input_ids:1x8:int64")])

    assert model.name == "my-encoder"


def test_huggingface_without_task_is_a_usage_error(bert_folder):
    folder, _ = bert_folder
    with pytest.raises(UsageError, match="--task"):
        load_model(str(folder))


def test_huggingface_unknown_task_is_a_usage_error(bert_folder):
    folder, _ = bert_folder
    with pytest.raises(UsageError, match="translation"):
        load_model(str(folder), task="translation")


def test_task_on_a_file_is_a_usage_error(tmp_path):
    path = tmp_path / "m.pt"
    torch.save(tiny_mlp()[0].state_dict(), path)
    with pytest.raises(UsageError, match="--task"):
        load_model(str(path), task="feature-extraction", factory="edgeq.examples:tiny_mlp")


# --- state dict + factory ------------------------------------------------------------------------------


def save_state(path: Path, state: dict[str, torch.Tensor]) -> None:
    if path.suffix == ".safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)


@pytest.mark.parametrize("filename", ["weights.pt", "weights.safetensors"])
def test_state_dict_loads_into_factory_model(tmp_path, filename):
    original = trained_mlp()
    _, (example,) = tiny_mlp()
    path = tmp_path / filename
    save_state(path, original.state_dict())

    model = load_model(str(path), factory="edgeq.examples:tiny_mlp")

    assert signature_of(model) == [("x", (1, 16), "float32")]
    assert model.outputs == ["output"]
    assert model.source.kind == "state_dict"
    assert model.name == "weights"
    assert_file_digest(model, path)
    loaded = model.module.inner.state_dict()
    assert loaded.keys() == original.state_dict().keys()
    for key, tensor in original.state_dict().items():
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(model.example_inputs[0], example)
    (out,) = run(model)
    torch.testing.assert_close(out, original(example))
    # The factory's own weights would give something else: the file's weights are the ones in use.
    assert not torch.allclose(out, tiny_mlp()[0](example))


def test_state_dict_in_training_checkpoint_layout(tmp_path):
    original = trained_mlp()
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": original.state_dict()}, path)

    model = load_model(str(path), factory="edgeq.examples:tiny_mlp")

    assert model.source.kind == "state_dict"
    (out,) = run(model)
    torch.testing.assert_close(out, original(*model.example_inputs))


@pytest.mark.parametrize("filename", ["weights.pt", "weights.safetensors"])
def test_state_dict_with_wrong_keys_names_them(tmp_path, filename):
    state = trained_mlp().state_dict()
    state["extra.weight"] = torch.zeros(2)
    del state["layers.0.bias"]
    path = tmp_path / filename
    save_state(path, state)

    with pytest.raises(SourceError) as info:
        load_model(str(path), factory="edgeq.examples:tiny_mlp")
    message = str(info.value)
    assert filename in message
    assert "edgeq.examples:tiny_mlp" in message
    assert "layers.0.bias" in message and "missing" in message
    assert "extra.weight" in message and "unexpected" in message


@pytest.mark.parametrize("filename", ["weights.pt", "weights.safetensors"])
def test_state_dict_with_wrong_shapes_names_key_and_file(tmp_path, filename):
    state = trained_mlp().state_dict()
    state["layers.0.weight"] = torch.zeros(64, 8)
    path = tmp_path / filename
    save_state(path, state)

    with pytest.raises(SourceError) as info:
        load_model(str(path), factory="edgeq.examples:tiny_mlp")
    message = str(info.value)
    assert filename in message
    assert "layers.0.weight" in message


def test_safetensors_without_factory_asks_for_factory(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_state(path, trained_mlp().state_dict())

    with pytest.raises(UsageError, match="--factory"):
        load_model(str(path))


def test_state_dict_pt_without_factory_asks_for_factory(tmp_path):
    path = tmp_path / "weights.pt"
    save_state(path, trained_mlp().state_dict())

    with pytest.raises(UsageError, match="--factory"):
        load_model(str(path))


def test_factory_with_callable_source_is_a_usage_error():
    with pytest.raises(UsageError, match="--factory"):
        load_model("edgeq.examples:tiny_mlp", factory="edgeq.examples:tiny_mlp")


# --- pickled whole model -------------------------------------------------------------------------------


def test_pickled_model_is_refused_without_trust(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(trained_mlp(), path)

    with pytest.raises(SourceError) as info:
        load_model(str(path), inputs=[parse_input_spec(MLP_INPUT)])
    assert "--trust-pickle" in str(info.value)
    assert "pickled" in str(info.value)


def test_pickled_model_loads_with_trust(tmp_path):
    original = trained_mlp()
    path = tmp_path / "whole.pt"
    torch.save(original, path)

    model = load_model(str(path), inputs=[parse_input_spec(MLP_INPUT)], trust_pickle=True)

    assert signature_of(model) == [("x", (1, 16), "float32")]
    assert model.outputs == ["output"]
    assert model.source.kind == "pickle"
    assert model.name == "whole"
    assert_file_digest(model, path)
    assert_matches_examples(model)
    (out,) = run(model)
    torch.testing.assert_close(out, original(*model.example_inputs))


# --- neither a path nor a callable ---------------------------------------------------------------------


@pytest.mark.parametrize("source", ["missing/model.pt", "not a reference"])
def test_missing_path_is_a_source_error(tmp_path, source):
    with pytest.raises(SourceError, match="neither an existing file"):
        load_model(str(tmp_path / source) if "/" in source else source)
