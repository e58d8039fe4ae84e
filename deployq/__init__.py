"""deployq: PyTorch -> QAT with distillation -> integer (QDQ) ONNX for onnxruntime, with per-layer parity.

The QAT API::

    import deployq
    qmodel = deployq.prepare(model, example_inputs, "quant.yaml")   # fx trace, dedupe, fuse, fake-quant
    deployq.calibrate(qmodel, calib_batches)                         # one observer pass, then quantize
    ... train qmodel ...
    deployq.save_checkpoint("qat.pt", qmodel, factory="pkg.mod:build", inputs=[...])
"""

from deployq._version import __version__
from deployq.checkpoint import InputSpec
from deployq.checkpoint import load as load_checkpoint
from deployq.checkpoint import save as save_checkpoint
from deployq.config import QConfig, load_config
from deployq.prepare import prepare, quant_points
from deployq.qat import calibrate, freeze_bn_stats, qparams_of, set_mode
from deployq.qspec import QuantSpec

__all__ = [
    "InputSpec", "QConfig", "QuantSpec", "__version__", "calibrate", "freeze_bn_stats",
    "load_checkpoint", "load_config", "prepare", "qparams_of", "quant_points", "save_checkpoint",
    "set_mode",
]
