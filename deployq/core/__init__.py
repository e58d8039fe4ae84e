"""The bottom layer: the one quantization formula, quant specs, the quant-point record and its
qparams.json schema, folding maths, registries, safe file writing and progress. It imports nothing
else from deployq."""
