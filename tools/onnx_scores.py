"""Scores of an .onnx file on a .npy batch of raw pixels (N, H, W, 3), in onnxruntime on one thread with
its default optimizations (its fused int8 kernels). benchmarks/onnx_int8.py runs it on an emulated
aarch64 Raspberry Pi (tools/pi_sysroot.py, trixie, onnxruntime site), where only numpy and onnxruntime
are installed. Prints onnxruntime's version.

    python tools/onnx_scores.py MODEL.onnx IMAGES.npy OUT.npy
"""
import sys

import numpy as np
import onnxruntime as ort

model, images, out = sys.argv[1:4]
opts = ort.SessionOptions()
opts.intra_op_num_threads = opts.inter_op_num_threads = 1
session = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
np.save(out, np.concatenate([session.run(None, {name: x[None]})[0] for x in np.load(images).astype(np.float32)]))
print(ort.__version__)
