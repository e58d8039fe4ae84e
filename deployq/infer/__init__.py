"""On-device inference with onnxruntime, for image models that take packed raw (N, 4, H, W) and
return an image (the flagship example: raw low-light enhancement); what ``deployq run`` does.

    engine   an onnxruntime session over an exported model (.onnx or .ort): whole frames or
             blended tiles, and its latency
    files    raw camera files (rawpy) or .npy arrays in, sRGB PNGs out, all or nothing
"""
