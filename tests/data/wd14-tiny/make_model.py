"""Writes model.onnx and selected_tags.csv of the tiny WD14-shaped tagger described in README.md (needs onnx)."""

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).parent
SIDE = 32
# BGR mean (0-1) -> logits of [rating general, red_background, blue_background, green_character]
W = np.array([[0, 0, 10, 0],    # B
              [0, 0, 0, 10],    # G
              [0, 10, 0, 0]],   # R
             dtype=np.float32)
B = np.array([2, -5, -5, -5], dtype=np.float32)

nodes = [
    helper.make_node("ReduceMean", ["input_1"], ["mean"], axes=[1, 2], keepdims=0),  # (1, 3)
    helper.make_node("Div", ["mean", "scale"], ["unit"]),
    helper.make_node("MatMul", ["unit", "W"], ["mm"]),
    helper.make_node("Add", ["mm", "B"], ["logits"]),
    helper.make_node("Sigmoid", ["logits"], ["predictions_sigmoid"]),
]
graph = helper.make_graph(
    nodes, "wd14_tiny",
    [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, [1, SIDE, SIDE, 3])],
    [helper.make_tensor_value_info("predictions_sigmoid", TensorProto.FLOAT, [1, 4])],
    initializer=[numpy_helper.from_array(np.array(255.0, dtype=np.float32), "scale"),
                 numpy_helper.from_array(W, "W"), numpy_helper.from_array(B, "B")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], producer_name="lib_lora tests")
model.ir_version = 8
onnx.checker.check_model(model)
onnx.save(model, str(HERE / "model.onnx"))
(HERE / "selected_tags.csv").write_text(
    "tag_id,name,category,count\n0,general,9,100\n1,red_background,0,50\n2,blue_background,0,40\n"
    "3,green_character,4,10\n", encoding="utf-8")
