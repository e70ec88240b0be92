"""Accuracy-aware int8: which operators stay fp32 is chosen by measured sensitivity until the
int8 graph passes its gate.

    flannel export int8 RUN_DIR                   # searches when the plain int8 graph fails
    flannel export int8 RUN_DIR --max-fp32-ops 0  # no search: one quantisation, one gate

Sensitivity is measured, not listed: the fully quantised QDQ graph runs a sample of training
images with the input of every quantised operator exposed twice (the fp32 tensor and what its
QuantizeLinear/DequantizeLinear pair hands on), and each operator is scored by the
signal-to-quantisation-noise ratio (SQNR, dB) of that input: the rounding that keeping the
operator in fp32 removes. Operators are then kept in fp32 most sensitive first, in groups of 1,
2, 4, ... , each candidate re-quantised and judged by the real gate on the whole validation split
(the served ONNX Runtime kernels of this host), until one passes or ``max_fp32_ops`` is reached.
What stayed fp32, its SQNR and rank, and every step of the search go into the manifest.
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sensitivity:
    """One quantised operator and the SQNR of its quantised input (lower: more sensitive)."""

    node: str
    op_type: str
    tensor: str
    sqnr_db: float

    def to_dict(self, rank: int, of: int) -> dict:
        return {"node": self.node, "op_type": self.op_type, "input": self.tensor,
                "input_sqnr_db": round(self.sqnr_db, 2),
                "reason": f"measured: input SQNR {self.sqnr_db:.1f} dB, rank {rank} of {of} "
                          "quantised operators"}


def quantised_inputs(model: onnx.ModelProto, candidates: set[str]) -> dict[str, tuple[str, str, str]]:
    """For each node of ``candidates`` whose first input is dequantised: (op type, the fp32
    tensor fed to its QuantizeLinear, the DequantizeLinear output it reads)."""
    producer = {out: node for node in model.graph.node for out in node.output}
    found = {}
    for node in model.graph.node:
        if node.name not in candidates or not node.input:
            continue
        dq = producer.get(node.input[0])
        if dq is None or dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is None or q.op_type != "QuantizeLinear":
            continue
        found[node.name] = (node.op_type, q.input[0], node.input[0])
    return found


def measure_sensitivity(qdq_path: Path, input_name: str, batches: list[np.ndarray],
                        candidates: set[str], threads: int) -> list[Sensitivity]:
    """Score every quantised operator of ``candidates`` on ``batches``; most sensitive first."""
    from flannel.backends import make_session

    model = onnx.load(str(qdq_path))
    pairs = quantised_inputs(model, candidates)
    if not pairs:
        return []
    existing = {o.name for o in model.graph.output}
    wanted = sorted({t for _, x, dq in pairs.values() for t in (x, dq)} - existing)
    for name in wanted:
        model.graph.output.append(onnx.ValueInfoProto(name=name))
    with tempfile.TemporaryDirectory(prefix="flannel-int8-sens-") as tmp:
        path = Path(tmp) / "exposed.onnx"
        onnx.save(model, str(path))
        session = make_session(path, threads)
        names = [o.name for o in session.get_outputs()]
        signal: dict[str, float] = {}
        noise: dict[str, float] = {}
        for batch in batches:
            got = dict(zip(names, session.run(names, {input_name: batch})))
            for node, (_, x, dq) in pairs.items():
                a = got[x].astype(np.float64)
                signal[node] = signal.get(node, 0.0) + float(np.sum(a ** 2))
                noise[node] = noise.get(node, 0.0) + float(np.sum((a - got[dq]) ** 2))
    scored = [Sensitivity(node, op, x, float("inf") if noise[node] == 0 else
                          10.0 * np.log10(max(signal[node], 1e-30) / noise[node]))
              for node, (op, x, _) in pairs.items()]
    return sorted(scored, key=lambda s: (s.sqnr_db, s.node))


def group_sizes(limit: int) -> list[int]:
    """0, 1, 2, 4, ... up to ``limit`` (always ending at ``limit`` when it is above 0)."""
    sizes, k = [0], 1
    while k < limit:
        sizes.append(k)
        k *= 2
    if limit > 0:
        sizes.append(limit)
    return sizes


def search(quantize_with: Callable[[list[str]], dict], gate: Callable[[], dict],
           ranked: Callable[[], list[Sensitivity]], max_fp32_ops: int) -> tuple[dict, list, list]:
    """Quantise, gate, and while the gate fails keep the next most sensitive operators in fp32.

    Args:
        quantize_with: writes the int8 graph with these extra nodes left fp32; returns its recipe.
        gate: judges the graph last written; returns the gate figures.
        ranked: the sensitivity ranking (measured on the graph first written, only if needed).
        max_fp32_ops: at most this many operators are kept fp32 by the search.

    Returns:
        (gate figures of the last graph written, the operators the search kept fp32 as dicts,
        one dict per step).
    """
    steps, order, kept = [], None, []
    for size in group_sizes(max_fp32_ops):
        if size:
            if order is None:
                order = ranked()
                log.info("int8 sensitivity: %d quantised operators measured; most sensitive %s",
                         len(order), ", ".join(f"{s.node} {s.sqnr_db:.1f} dB" for s in order[:3]))
            size = min(size, len(order))
            if size == steps[-1]["kept_fp32"]:
                break
        kept = [s.to_dict(i + 1, len(order)) for i, s in enumerate((order or [])[:size])]
        recipe = quantize_with([k["node"] for k in kept])
        result = gate()
        steps.append({"kept_fp32": size, "argmax_agreement": result["argmax_agreement"],
                      "macro_f1_drop": result["macro_f1_drop"], "passed": result["passed"],
                      "quantize_linear_nodes": recipe.get("quantize_linear_nodes")})
        log.info("int8 search: %d operator(s) kept fp32 -> argmax agreement %.4f, macro-F1 drop "
                 "%.4f, %s", size, result["argmax_agreement"], result["macro_f1_drop"],
                 "passed" if result["passed"] else "failed")
        if result["passed"]:
            break
    return result, kept, steps
