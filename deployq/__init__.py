"""deployq: PyTorch -> QAT with distillation -> integer (QDQ) ONNX for onnxruntime, with per-layer parity.

The API (docs/api.md)::

    import deployq
    qmodel = deployq.prepare(model, example_inputs, "quant.yaml")   # fx trace, dedupe, fuse, fake-quant
    deployq.calibrate(qmodel, calib_batches)                         # one observer pass, then quantize
    ... train qmodel ...
    result = deployq.export(qmodel, example_inputs, "build/")        # float + QDQ ONNX, qparams.json
    report = deployq.diff(result.files["float"], result.files["int8"], inputs=calib_batches)
    parity = deployq.check(qmodel, result.files["int8"])             # torch vs onnxruntime, in codes

The names below are imported on first use, so ``import deployq`` (and the ``deployq`` command's
start-up, and its --help) does not wait for torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from deployq._version import __version__

_API = {  # name: (module, attribute)
    "export": ("deployq.api", "export"),
    "diff": ("deployq.api", "diff"),
    "check": ("deployq.api", "check"),
    "load_model": ("deployq.api", "load_model"),
    "inspect": ("deployq.api", "inspect"),
    "hessian": ("deployq.api", "hessian"),
    "write_distill": ("deployq.api", "write_distill"),
    "train": ("deployq.api", "train"),
    "run": ("deployq.api", "run"),
    "latency": ("deployq.api", "latency"),
    "ExportResult": ("deployq.deploy.export", "ExportResult"),
    "DiffReport": ("deployq.verify.stats", "DiffReport"),
    "ParityReport": ("deployq.verify.check", "ParityReport"),
    "InputSpec": ("deployq.qat.checkpoint", "InputSpec"),
    "load_checkpoint": ("deployq.qat.checkpoint", "load"),
    "save_checkpoint": ("deployq.qat.checkpoint", "save"),
    "QConfig": ("deployq.qat.config", "QConfig"),
    "load_config": ("deployq.qat.config", "load_config"),
    "prepare": ("deployq.qat.prepare", "prepare"),
    "quant_points": ("deployq.qat.prepare", "quant_points"),
    "calibrate": ("deployq.qat.calibrate", "calibrate"),
    "freeze_bn_stats": ("deployq.qat.calibrate", "freeze_bn_stats"),
    "qparams_of": ("deployq.qat.calibrate", "qparams_of"),
    "set_mode": ("deployq.qat.calibrate", "set_mode"),
    "QuantSpec": ("deployq.core.qspec", "QuantSpec"),
}

if TYPE_CHECKING:
    from deployq.api import check, diff, export, hessian, inspect, latency, load_model, run, train, write_distill
    from deployq.verify.stats import DiffReport
    from deployq.deploy.export import ExportResult
    from deployq.verify.check import ParityReport
    from deployq.qat.checkpoint import InputSpec
    from deployq.qat.checkpoint import load as load_checkpoint
    from deployq.qat.checkpoint import save as save_checkpoint
    from deployq.qat.config import QConfig, load_config
    from deployq.qat.prepare import prepare, quant_points
    from deployq.qat.calibrate import calibrate, freeze_bn_stats, qparams_of, set_mode
    from deployq.core.qspec import QuantSpec


def __getattr__(name: str) -> Any:
    """The API names, imported on first use (PEP 562)."""
    if name in _API:
        module, attribute = _API[name]
        return getattr(importlib.import_module(module), attribute)
    raise AttributeError(f"module 'deployq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))


__all__ = sorted([*_API, "__version__"])
