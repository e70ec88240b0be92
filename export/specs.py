"""Declarative export specs: input/output names, axes, opset and tolerances per model kind.

Export, parity, the handler and the tests all read these, never their own copies of the names.
"""
from __future__ import annotations

from dataclasses import dataclass

# Dynamo exporter with onnxscript needs opset 18 or later.
DEFAULT_OPSET = 18
# fp32 PyTorch vs ONNX Runtime: kernels differ in summation order; 1e-4 on probabilities in [0, 1]
# is ~1000x the fp32 epsilon and far below any decision margin that matters.
FP32_ATOL = 1e-4
FP32_RTOL = 1e-3
# Batch sizes parity is checked at: single requests, an odd size, and a typical serving batch.
PARITY_BATCH_SIZES = (1, 3, 8)


@dataclass(frozen=True)
class OnnxSpec:
    """Names, axes and tolerances of one exported graph kind."""

    kind: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    batch_axis_name: str = "batch"
    opset: int = DEFAULT_OPSET
    atol: float = FP32_ATOL
    rtol: float = FP32_RTOL
    decision_output: str = "probabilities"


# A base learner: one image batch in; logits and softmax probabilities out.
LEARNER = OnnxSpec(kind="learner", input_names=("image",), output_names=("logits", "probabilities"))

SPECS = {LEARNER.kind: LEARNER}
