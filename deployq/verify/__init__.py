"""Stage 4, verify: onnxruntime sessions, matching quant points across two ONNX files, `diff`
(per-layer SQNR in four modes), `check` (torch vs onnxruntime parity in codes), the HTML report."""
