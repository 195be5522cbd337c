"""int8 per-row tables gathered as int8 rows -> Cast -> Mul by row scale (converters/onnx_dynamic.py
gather_int8_tables): the same values as DequantizeLinear -> Gather; at constant indices (a position-embedding table)
ORT folds them into a constant at load; weight parity still reads the plan's codes and scales."""

from __future__ import annotations

import numpy as np

from tests.conftest import ONNX

pytestmark = ONNX


def _graph(ids_constant: bool):
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    codes = numpy_helper.from_array(rng.integers(-127, 128, (64, 16)).astype(np.int8), "inner.pos.weight.codes")
    scale = numpy_helper.from_array(rng.uniform(0.01, 0.1, 64).astype(np.float32), "pos_scale")
    ids = np.arange(12, dtype=np.int64).reshape(1, 12)
    initializers = [codes, scale] + ([numpy_helper.from_array(ids, "ids")] if ids_constant else [])
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 12, 16])]
    if not ids_constant:
        inputs.append(helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 12]))
    nodes = [
        helper.make_node("DequantizeLinear", ["inner.pos.weight.codes", "pos_scale"], ["table"], axis=0),
        helper.make_node("Gather", ["table", "ids"], ["rows"]),
        helper.make_node("Add", ["x", "rows"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12, 16])], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), ids


def _run(model, feeds, optimized=None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    if optimized is not None:
        options.optimized_model_filepath = str(optimized)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_constant_index_table_folds_at_load_with_the_same_values_and_parity(tmp_path):
    import onnx

    from edgeq.converters.onnx_dynamic import gather_int8_tables
    from edgeq.converters.parity import onnx_weights

    model, _ = _graph(ids_constant=True)
    x = np.random.default_rng(1).normal(size=(1, 12, 16)).astype(np.float32)
    expected = _run(model, {"x": x})
    assert gather_int8_tables(model) == ["inner.pos.weight.codes"]
    onnx.checker.check_model(model)
    assert "DequantizeLinear" not in [n.op_type for n in model.graph.node]
    assert np.array_equal(_run(model, {"x": x}, tmp_path / "optimized.onnx"), expected)  # bit-exact
    assert [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node] == ["Add"]  # folded at load

    path = tmp_path / "model.onnx"
    onnx.save_model(model, str(path))
    codes, scale = onnx_weights(path).quantized["pos"]
    original, _ = _graph(ids_constant=True)
    tensors = {i.name: onnx.numpy_helper.to_array(i) for i in original.graph.initializer}
    assert np.array_equal(codes, tensors["inner.pos.weight.codes"]) and np.array_equal(scale, tensors["pos_scale"])


def test_table_read_at_runtime_indices_gathers_int8_rows_first():
    from edgeq.converters.onnx_dynamic import gather_int8_tables

    model, ids = _graph(ids_constant=False)
    feeds = {"x": np.zeros((1, 12, 16), np.float32), "ids": (ids * 5) % 64}
    expected = _run(model, feeds)
    assert gather_int8_tables(model) == ["inner.pos.weight.codes"]
    ops = [n.op_type for n in model.graph.node]
    assert "DequantizeLinear" not in ops and ops.count("Gather") == 2
    assert np.array_equal(_run(model, feeds), expected)
