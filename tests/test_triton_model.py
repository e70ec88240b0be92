"""The Triton adapter's per-request boundary (flannel.handlers.triton_model), without Triton:
a stand-in for the Python backend's ``triton_python_backend_utils`` records what it is given.

The adapter inside a real Triton is tested in tests/test_triton_serving.py.
"""
from __future__ import annotations

import base64
import sys
import types

import numpy as np
import pytest

from flannel.handlers import serving
from flannel.handlers.triton_model import (IMAGE_INPUT, TritonPythonModel, element_base64,
                                           error_message, output_arrays)


class _Error:
    INVALID_ARG, UNAVAILABLE, INTERNAL = "INVALID_ARG", "UNAVAILABLE", "INTERNAL"

    def __init__(self, message: str, code: str) -> None:
        self.message, self.code = message, code


class _Response:
    def __init__(self, output_tensors, error=None) -> None:
        self.outputs, self.error = output_tensors, error


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        if array.dtype == object and not all(isinstance(v, bytes) for v in array.ravel()):
            raise TypeError("BYTES elements must be bytes")
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Request:
    def __init__(self, data: bytes | None, broken: bool = False) -> None:
        self.data, self.broken = data, broken

    def inputs(self):
        if self.broken:
            raise RuntimeError("the stub could not read this tensor")
        return [_Tensor(IMAGE_INPUT, np.array([[self.data]], dtype=object))]

    def request_id(self) -> str:
        return "r"

    def parameters(self) -> str:
        return "{}"


@pytest.fixture
def adapter(monkeypatch):
    """A TritonPythonModel whose served model answers each image's length, and whose answer for
    an image of b"unwritable" cannot be made into a tensor."""
    stub = types.SimpleNamespace(Tensor=_Tensor, InferenceResponse=_Response, TritonError=_Error)
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)

    def answer_batch(model, items, stats, headers):
        out = []
        for item in items:
            data = base64.b64decode(item["inputs"][0]["data"][0])
            value = [None] if data == b"unwritable" else [str(len(data))]
            out.append(serving.Answer(200, "OK", {"outputs": [
                {"name": "prediction", "datatype": "BYTES", "shape": [1], "data": value}]}))
        return out

    monkeypatch.setattr(serving, "answer_batch", answer_batch)
    model = TritonPythonModel()
    model.served = types.SimpleNamespace(name="m")
    model._metrics = types.SimpleNamespace(report=lambda stats: None)
    return model


def test_an_unreadable_request_and_an_unwritable_answer_cost_only_their_own(adapter):
    requests = [_Request(b"abc"), _Request(None, broken=True), _Request(b"unwritable"),
                _Request(b"defgh")]
    responses = adapter.execute(requests)
    assert len(responses) == 4
    assert responses[0].error is None and responses[0].outputs[0].as_numpy().tolist() == [b"3"]
    assert responses[3].error is None and responses[3].outputs[0].as_numpy().tolist() == [b"5"]
    for i in (1, 2):
        assert responses[i].error.code == _Error.INTERNAL
        assert responses[i].error.message.startswith("500: InternalError")
        assert "error id" in responses[i].error.message


def test_file_bytes_and_base64_text_both_become_the_body_s_base64():
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    text = base64.b64encode(png)
    assert element_base64(png) == element_base64(text) == text.decode()
    # Text outside base64's alphabet, or of a length base64 never has, is a file's bytes.
    assert base64.b64decode(element_base64(b"%%%")) == b"%%%"
    assert base64.b64decode(element_base64(b"abcde")) == b"abcde"


def test_refusals_carry_their_status_first_and_outputs_keep_their_types():
    assert error_message(422, {"error": "not a chest radiograph"}) == "422: not a chest radiograph"
    arrays = output_arrays({"outputs": [
        {"name": "probabilities", "datatype": "FP32", "shape": [1, 2], "data": [0.25, 0.75]},
        {"name": "refer", "datatype": "BOOL", "shape": [1], "data": [True]},
        {"name": "classes", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]}]})
    assert arrays["probabilities"].dtype == np.float32 and arrays["probabilities"].shape == (1, 2)
    assert arrays["refer"].dtype == np.bool_ and arrays["classes"].tolist() == [b"a", b"b"]
