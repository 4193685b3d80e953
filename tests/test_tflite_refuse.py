"""What defer cannot cut is refused with one clear line (a UsageError, exit code 2): a model with
several subgraphs (control flow), a Flex (TensorFlow) op, a custom op, resource variables, a
corrupt flatbuffer, a file that is not TFLite at all.
"""

from __future__ import annotations

import random

import pytest

from defer.errors import UsageError
from tests.tflite_helpers import need_tensorflow, tflite_bytes

pytestmark = pytest.mark.keras


@pytest.fixture(scope="module")
def tf():
    need_tensorflow()
    import tensorflow as tf

    return tf


def _refused(source) -> str:
    from defer.compiler.tflite import read_tflite

    with pytest.raises(UsageError) as info:
        read_tflite(source)
    message = str(info.value)
    assert "\n" not in message and info.value.exit_code == 2
    return message


def _convert(tf, function, select_tf_ops: bool = False) -> bytes:
    converter = tf.lite.TFLiteConverter.from_concrete_functions(
        [function.get_concrete_function()], function)
    if select_tf_ops:
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS,
                                               tf.lite.OpsSet.SELECT_TF_OPS]
    return converter.convert()


def test_several_subgraphs_are_refused(tf, tmp_path):
    @tf.function(input_signature=[tf.TensorSpec([1, 4], tf.float32)])
    def loop(x):
        return tf.while_loop(lambda i, y: i < 3, lambda i, y: (i + 1, y * 2.0),
                             [tf.constant(0), x])[1]

    path = tmp_path / "while.tflite"
    path.write_bytes(_convert(tf, loop))
    message = _refused(path)
    assert message.startswith(str(path)) and "subgraphs" in message


def test_flex_ops_are_refused(tf):
    @tf.function(input_signature=[tf.TensorSpec([4, 4], tf.float32)])
    def determinant(x):
        return tf.linalg.det(x)

    message = _refused(_convert(tf, determinant, select_tf_ops=True))
    assert "Flex" in message and "TFLITE_BUILTINS" in message


def _mutated(opcode_change) -> bytes:
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.read_model_from_bytearray(bytearray(tflite_bytes("tiny_cnn")))
    opcode_change(model.operatorCodes[0])
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def test_custom_ops_and_resource_variables_are_refused(tf):
    def custom(code):
        code.builtinCode = code.deprecatedBuiltinCode = 32  # CUSTOM
        code.customCode = "MyFancyOp"

    def variable(code):
        code.builtinCode, code.deprecatedBuiltinCode = 142, 127  # VAR_HANDLE, "see builtinCode"
    assert "custom ops MyFancyOp" in _refused(_mutated(custom))
    assert "resource variables" in _refused(_mutated(variable))


@pytest.mark.parametrize("damage", ["truncated", "zeroed", "noise"])
def test_corrupt_flatbuffers_are_refused(tf, damage):
    data = bytearray(tflite_bytes("tiny_cnn"))
    if damage == "truncated":
        data = data[: len(data) // 2]
    elif damage == "zeroed":
        data[100:400] = bytes(300)
    else:
        rng = random.Random(0)
        data[8:2000] = bytes(rng.randrange(256) for _ in range(1992))
    assert "corrupt" in _refused(bytes(data))


def test_not_a_tflite_file(tmp_path):
    pytest.importorskip("ai_edge_litert")
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x08\x07\x12\x04onnx" + bytes(64))
    assert "not a TFLite model" in _refused(path)
    assert "no such file" in _refused(tmp_path / "missing.tflite")
