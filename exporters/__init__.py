"""ONNX export and the graph rewriter (one module per pass)."""
