"""Stage 3, export: a QAT model to float and QDQ ONNX through exporters/, device profiles."""
