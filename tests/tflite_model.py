"""A TFLite model written with the flatbuffers schema of the ``tflite``
package (no TensorFlow): one FULLY_CONNECTED layer, ``scores = x @ W.T + b``,
input ``x`` [1, n_in] float32, output ``scores`` [1, n_out] float32."""
import flatbuffers
import numpy as np
import tflite


def fully_connected(w: np.ndarray, b: np.ndarray) -> bytes:
    w = np.ascontiguousarray(w, np.float32)
    b = np.ascontiguousarray(b, np.float32)
    n_out, n_in = w.shape
    fb = flatbuffers.Builder(1024)

    def vec_i32(start, values):
        start(fb, len(values))
        for v in reversed(values):
            fb.PrependInt32(v)
        return fb.EndVector()

    def buffer(data: bytes):
        if data:
            fb.StartVector(1, len(data), 16)
            for byte in reversed(data):
                fb.PrependUint8(byte)
            vec = fb.EndVector()
        tflite.BufferStart(fb)
        if data:
            tflite.BufferAddData(fb, vec)
        return tflite.BufferEnd(fb)

    buffers = [buffer(b""), buffer(w.tobytes()), buffer(b.tobytes()), buffer(b""), buffer(b"")]

    def tensor(name, shape, buf):
        n = fb.CreateString(name)
        s = vec_i32(tflite.TensorStartShapeVector, list(shape))
        tflite.TensorStart(fb)
        tflite.TensorAddShape(fb, s)
        tflite.TensorAddType(fb, tflite.TensorType.FLOAT32)
        tflite.TensorAddBuffer(fb, buf)
        tflite.TensorAddName(fb, n)
        return tflite.TensorEnd(fb)

    tensors = [tensor("x", (1, n_in), 3), tensor("weights", (n_out, n_in), 1), tensor("bias", (n_out,), 2),
               tensor("scores", (1, n_out), 4)]
    tflite.FullyConnectedOptionsStart(fb)
    opts = tflite.FullyConnectedOptionsEnd(fb)
    ins = vec_i32(tflite.OperatorStartInputsVector, [0, 1, 2])
    outs = vec_i32(tflite.OperatorStartOutputsVector, [3])
    tflite.OperatorStart(fb)
    tflite.OperatorAddOpcodeIndex(fb, 0)
    tflite.OperatorAddInputs(fb, ins)
    tflite.OperatorAddOutputs(fb, outs)
    tflite.OperatorAddBuiltinOptionsType(fb, tflite.BuiltinOptions.FullyConnectedOptions)
    tflite.OperatorAddBuiltinOptions(fb, opts)
    op = tflite.OperatorEnd(fb)

    tflite.SubGraphStartTensorsVector(fb, len(tensors))
    for t in reversed(tensors):
        fb.PrependUOffsetTRelative(t)
    tvec = fb.EndVector()
    gin = vec_i32(tflite.SubGraphStartInputsVector, [0])
    gout = vec_i32(tflite.SubGraphStartOutputsVector, [3])
    tflite.SubGraphStartOperatorsVector(fb, 1)
    fb.PrependUOffsetTRelative(op)
    ovec = fb.EndVector()
    name = fb.CreateString("main")
    tflite.SubGraphStart(fb)
    tflite.SubGraphAddTensors(fb, tvec)
    tflite.SubGraphAddInputs(fb, gin)
    tflite.SubGraphAddOutputs(fb, gout)
    tflite.SubGraphAddOperators(fb, ovec)
    tflite.SubGraphAddName(fb, name)
    graph = tflite.SubGraphEnd(fb)

    tflite.OperatorCodeStart(fb)
    tflite.OperatorCodeAddDeprecatedBuiltinCode(fb, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddBuiltinCode(fb, tflite.BuiltinOperator.FULLY_CONNECTED)
    tflite.OperatorCodeAddVersion(fb, 1)
    code = tflite.OperatorCodeEnd(fb)

    tflite.ModelStartOperatorCodesVector(fb, 1)
    fb.PrependUOffsetTRelative(code)
    codes = fb.EndVector()
    tflite.ModelStartSubgraphsVector(fb, 1)
    fb.PrependUOffsetTRelative(graph)
    graphs = fb.EndVector()
    tflite.ModelStartBuffersVector(fb, len(buffers))
    for bf in reversed(buffers):
        fb.PrependUOffsetTRelative(bf)
    bvec = fb.EndVector()
    desc = fb.CreateString("edgeml test model")
    tflite.ModelStart(fb)
    tflite.ModelAddVersion(fb, 3)
    tflite.ModelAddOperatorCodes(fb, codes)
    tflite.ModelAddSubgraphs(fb, graphs)
    tflite.ModelAddDescription(fb, desc)
    tflite.ModelAddBuffers(fb, bvec)
    fb.Finish(tflite.ModelEnd(fb), file_identifier=b"TFL3")
    return bytes(fb.Output())
