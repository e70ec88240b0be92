"""The accuracy-aware int8 search: sensitivity measured on a QDQ graph, operators kept fp32
most sensitive first in growing groups until the gate passes."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flannel.export.int8 import resolve_reduce_range
from flannel.export.int8_search import (Sensitivity, group_sizes, measure_sensitivity,
                                        quantised_inputs, search)


def test_group_sizes_double_and_end_at_the_limit():
    assert group_sizes(0) == [0]
    assert group_sizes(1) == [0, 1]
    assert group_sizes(5) == [0, 1, 2, 4, 5]
    assert group_sizes(8) == [0, 1, 2, 4, 8]


def _ranked(n):
    return [Sensitivity(f"n{i}", "Conv", f"t{i}", float(i)) for i in range(n)]


def _run(passes_at: int, limit: int, operators: int = 10):
    written, measured = [], []

    def quantize_with(extra):
        written.append(list(extra))
        return {"quantize_linear_nodes": 10 - len(extra)}

    def gate():
        ok = len(written[-1]) >= passes_at
        return {"passed": ok, "argmax_agreement": 1.0 if ok else 0.9, "macro_f1_drop": 0.0}

    def ranked():
        measured.append(1)
        return _ranked(operators)

    return search(quantize_with, gate, ranked, limit), written, measured


def test_search_stops_at_the_first_group_that_passes_most_sensitive_first():
    (result, kept, steps), written, measured = _run(passes_at=3, limit=32)
    assert result["passed"] and [s["kept_fp32"] for s in steps] == [0, 1, 2, 4]
    assert written[-1] == ["n0", "n1", "n2", "n3"]  # lowest SQNR first
    assert [k["node"] for k in kept] == written[-1] and measured == [1]
    assert kept[0]["reason"].startswith("measured: input SQNR 0.0 dB, rank 1 of 10")
    assert [s["passed"] for s in steps] == [False, False, False, True]


def test_a_graph_that_passes_at_once_is_never_measured():
    (result, kept, steps), _, measured = _run(passes_at=0, limit=32)
    assert result["passed"] and kept == [] and len(steps) == 1 and measured == []


def test_search_respects_its_limit_and_the_number_of_operators():
    (result, kept, steps), _, _ = _run(passes_at=99, limit=6)
    assert not result["passed"] and [s["kept_fp32"] for s in steps] == [0, 1, 2, 4, 6]
    (result, kept, steps), _, _ = _run(passes_at=99, limit=32, operators=3)
    assert [s["kept_fp32"] for s in steps] == [0, 1, 2, 3] and len(kept) == 3
    (result, _, steps), _, measured = _run(passes_at=99, limit=0)
    assert len(steps) == 1 and measured == []


def test_reduce_range_follows_the_cpus_int8_dot_product_instructions():
    assert resolve_reduce_range("auto", frozenset({"avx2", "fma"}))[0] is True
    assert resolve_reduce_range("auto", frozenset({"avx512f", "avx512_vnni"}))[0] is False
    assert resolve_reduce_range("auto", frozenset({"amx_int8"}))[0] is False
    assert resolve_reduce_range("off", frozenset())[0] is False
    with pytest.raises(ValueError, match="use auto, on or off"):
        resolve_reduce_range("7bit")


def _qdq_chain(path, scales):
    """x -> [Q -> DQ -> MatMul] per scale: each MatMul's input rounded at its own scale."""
    nodes, inits, current = [], [], "x"
    for i, scale in enumerate(scales):
        inits += [numpy_helper.from_array(np.array(scale, np.float32), f"s{i}"),
                  numpy_helper.from_array(np.array(128, np.uint8), f"z{i}"),
                  numpy_helper.from_array(np.eye(4, dtype=np.float32), f"w{i}")]
        nodes += [helper.make_node("QuantizeLinear", [current, f"s{i}", f"z{i}"], [f"q{i}"]),
                  helper.make_node("DequantizeLinear", [f"q{i}", f"s{i}", f"z{i}"], [f"dq{i}"]),
                  helper.make_node("MatMul", [f"dq{i}", f"w{i}"], [f"y{i}"], name=f"mm{i}")]
        current = f"y{i}"
    graph = helper.make_graph(nodes, "chain",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info(current, TensorProto.FLOAT,
                                                             [None, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10  # what ONNX Runtime reads
    onnx.save(model, str(path))


def test_sensitivity_ranks_the_coarsely_rounded_input_first(tmp_path):
    path = tmp_path / "chain.onnx"
    _qdq_chain(path, [0.01, 0.5, 0.008])  # 0.008 still holds [-1, 1]
    model = onnx.load(str(path))
    assert quantised_inputs(model, {"mm0", "mm1", "mm2"})["mm1"] == ("MatMul", "y0", "dq1")
    x = np.random.default_rng(0).uniform(-1, 1, (16, 4)).astype(np.float32)
    ranked = measure_sensitivity(path, "x", [x[:8], x[8:]], {"mm0", "mm1", "mm2"}, threads=1)
    assert [s.node for s in ranked] == ["mm1", "mm0", "mm2"]
    assert ranked[0].sqnr_db < 15 < 30 < ranked[1].sqnr_db < ranked[2].sqnr_db
    assert [s.node for s in measure_sensitivity(path, "x", [x], {"mm2"}, 1)] == ["mm2"]


def test_learners_are_kept_fp32_largest_share_first_never_all_of_them():
    from flannel.export.int8_search import MemberShare, search_members

    order = [MemberShare("densenet121", ("a", "b"), 0.03), MemberShare("resnet18", ("c",), 0.01),
             MemberShare("squeezenet1_1", ("d",), 0.002)]
    written, steps = [], [{"kept_fp32": 32, "passed": False}]

    def quantize_with(extra):
        written.append(list(extra))
        return {"quantize_linear_nodes": 4 - len(extra)}

    def gate():
        ok = "c" in written[-1]
        return {"passed": ok, "argmax_agreement": 1.0 if ok else 0.97, "macro_f1_drop": 0.0}

    result, kept = search_members(quantize_with, gate, lambda: order, steps)
    assert result["passed"] and written == [["a", "b"], ["c"]]  # the first that passes wins
    assert [k["member"] for k in kept] == ["resnet18"] and "rank 2 of 3 learners" in \
        kept[0]["reason"] and kept[0]["operators"] == 1
    assert steps[-1]["kept_fp32_learners"] == ["resnet18"] and steps[-1]["passed"]

    def better_with_squeezenet():
        last = written[-1]
        agreement = 0.95 if last == ["d"] else 0.99 if "d" in last and "a" in last else 0.9
        return {"passed": agreement >= 0.99, "argmax_agreement": agreement, "macro_f1_drop": 0}

    written.clear()
    result, kept = search_members(quantize_with, better_with_squeezenet, lambda: order, [])
    # round 1: none passes, squeezenet agrees most; round 2 adds to it, largest share first
    assert written == [["a", "b"], ["c"], ["d"], ["d", "a", "b"]] and result["passed"]
    assert [k["member"] for k in kept] == ["squeezenet1_1", "densenet121"]
    written.clear()
    never, kept = search_members(quantize_with, lambda: {"passed": False, "argmax_agreement": 0.9,
                                                         "macro_f1_drop": 0.1}, lambda: order, [])
    assert not never["passed"] and len(kept) == 2  # the last learner always stays int8
    assert written[-1] == written[3]  # the best set found is the graph left written
