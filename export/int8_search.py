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

Per-operator SQNR finds a layer that rounding ruins; it cannot find noise spread thinly over
every layer of one learner, which an ensemble's near-tie images still feel. So when no group of
operators passes, an ensemble's learners are ranked too, by their measured share of the change in
the fused answer: FLANNEL fuses ``sum_i w_i p_i``, so learner i's share on an image is
``w_i |p_i(int8) - p_i(fp32)|``, averaged over the calibration images. Learners are then kept
whole in fp32 by greedy forward selection in that order: one more learner per round, the first
candidate that passes the gate wins, otherwise the round's best is kept (one learner always stays
int8).
"""
from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

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


def exposed_outputs(path: Path, tensors: list[str], input_name: str, batches: list[np.ndarray],
                    threads: int) -> Iterator[dict[str, np.ndarray]]:
    """For each batch, the values of ``tensors`` (intermediate or not) in the graph at ``path``:
    a copy of the graph that lists them among its outputs runs on ONNX Runtime."""
    from flannel.backends import make_session

    model = onnx.load(str(path))
    existing = {o.name for o in model.graph.output}
    for name in tensors:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    with tempfile.TemporaryDirectory(prefix="flannel-int8-exposed-") as tmp:
        exposed = Path(tmp) / "exposed.onnx"
        onnx.save(model, str(exposed))
        session = make_session(exposed, threads)
    for batch in batches:
        yield dict(zip(tensors, session.run(tensors, {input_name: batch})))


def measure_sensitivity(qdq_path: Path, input_name: str, batches: list[np.ndarray],
                        candidates: set[str], threads: int) -> list[Sensitivity]:
    """Score every quantised operator of ``candidates`` on ``batches``; most sensitive first."""
    pairs = quantised_inputs(onnx.load(str(qdq_path)), candidates)
    if not pairs:
        return []
    wanted = sorted({t for _, x, dq in pairs.values() for t in (x, dq)})
    signal = dict.fromkeys(pairs, 0.0)
    noise = dict.fromkeys(pairs, 0.0)
    for got in exposed_outputs(qdq_path, wanted, input_name, batches, threads):
        for node, (_, x, dq) in pairs.items():
            a = got[x].astype(np.float64)
            signal[node] += float(np.sum(a ** 2))
            noise[node] += float(np.sum((a - got[dq]) ** 2))
    scored = [Sensitivity(node, op, x, float("inf") if noise[node] == 0 else
                          10.0 * np.log10(max(signal[node], 1e-30) / noise[node]))
              for node, (op, x, _) in pairs.items()]
    return sorted(scored, key=lambda s: (s.sqnr_db, s.node))


@dataclass(frozen=True)
class MemberShare:
    """One learner of an ensemble and its measured share of the fused answer's change."""

    member: str
    nodes: tuple[str, ...]
    share: float

    def to_dict(self, rank: int, of: int) -> dict:
        return {"member": self.member, "operators": len(self.nodes),
                "fused_change_share": round(self.share, 5),
                "reason": f"measured: mean w|p(int8) - p(fp32)| {self.share:.4f}, rank {rank} "
                          f"of {of} learners"}


def member_shares(fp32_path: Path, qdq_path: Path, input_name: str, batches: list[np.ndarray],
                  members: dict[str, tuple[list[str], str]], weights_output: str,
                  threads: int) -> list[MemberShare]:
    """Rank ensemble members by ``w_i |p_i(int8) - p_i(fp32)|`` on ``batches``, largest first.

    Args:
        members: member name -> (its quantisable nodes, the tensor of its probabilities).
        weights_output: the graph output holding the fusion's learner weights (N, members).
    """
    names = [*(t for _, t in members.values()), weights_output]

    def values(path: Path) -> dict[str, np.ndarray]:
        runs = list(exposed_outputs(path, names, input_name, batches, threads))
        return {n: np.concatenate([r[n] for r in runs]) for n in names}

    fp32, int8 = values(fp32_path), values(qdq_path)
    weights = fp32[weights_output]
    shares = []
    for i, (member, (nodes, tensor)) in enumerate(members.items()):
        change = np.abs(int8[tensor] - fp32[tensor]).sum(axis=1)
        shares.append(MemberShare(member, tuple(nodes), float((weights[:, i] * change).mean())))
    return sorted(shares, key=lambda m: (-m.share, m.member))


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


def search_members(quantize_with: Callable[[list[str]], dict], gate: Callable[[], dict],
                   ranked: Callable[[], list[MemberShare]], steps: list) -> tuple[dict | None, list]:
    """Greedy forward selection of learners to keep whole in fp32, until the gate passes.

    Each round tries adding every learner not yet kept, in the order of their measured share
    (largest first), and stops at the first candidate that passes; if none does, the one with the
    highest argmax agreement is kept and the next round starts. One learner always stays int8.
    The gate's figures move by whole images, so a larger set is not always better: every set is
    judged, none is assumed. Appends one step per candidate to ``steps``.

    Returns:
        (the gate figures of the set kept, None if nothing was tried; that set as dicts).
    """
    order = ranked()
    log.info("int8 learners' share of the fused change: %s",
             ", ".join(f"{m.member} {m.share:.4f}" for m in order))
    rank = {m.member: i + 1 for i, m in enumerate(order)}
    chosen: list[MemberShare] = []
    best: tuple[dict, list[MemberShare]] | None = None
    while len(chosen) < len(order) - 1:
        round_best = None
        for member in (m for m in order if m not in chosen):
            trial = [*chosen, member]
            recipe = quantize_with([n for m in trial for n in m.nodes])
            result = gate()
            steps.append({"kept_fp32_learners": [m.member for m in trial],
                          "kept_fp32": sum(len(m.nodes) for m in trial),
                          "argmax_agreement": result["argmax_agreement"],
                          "macro_f1_drop": result["macro_f1_drop"], "passed": result["passed"],
                          "quantize_linear_nodes": recipe.get("quantize_linear_nodes")})
            log.info("int8 search: learners %s kept fp32 -> argmax agreement %.4f, macro-F1 drop "
                     "%.4f, %s", ", ".join(m.member for m in trial), result["argmax_agreement"],
                     result["macro_f1_drop"], "passed" if result["passed"] else "failed")
            if result["passed"]:
                quantized = [m.to_dict(rank[m.member], len(order)) for m in trial]
                return result, quantized
            if round_best is None or result["argmax_agreement"] > round_best[0]["argmax_agreement"]:
                round_best = (result, trial)
        chosen = round_best[1]
        best = round_best
    if best is None:
        return None, []
    # The graph last written is the last candidate tried: write the best one again.
    quantize_with([n for m in best[1] for n in m.nodes])
    return gate(), [m.to_dict(rank[m.member], len(order)) for m in best[1]]
