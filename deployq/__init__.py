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
import sys
import types
from typing import TYPE_CHECKING, Any

from deployq._version import __version__

_API = {  # name: (module, attribute)
    "export": ("deployq.api", "export"),
    "diff": ("deployq.api", "diff"),
    "check": ("deployq.api", "check"),
    "ExportResult": ("deployq.export", "ExportResult"),
    "DiffReport": ("deployq.diff", "DiffReport"),
    "ParityReport": ("deployq.parity", "ParityReport"),
    "InputSpec": ("deployq.checkpoint", "InputSpec"),
    "load_checkpoint": ("deployq.checkpoint", "load"),
    "save_checkpoint": ("deployq.checkpoint", "save"),
    "QConfig": ("deployq.config", "QConfig"),
    "load_config": ("deployq.config", "load_config"),
    "prepare": ("deployq.prepare", "prepare"),
    "quant_points": ("deployq.prepare", "quant_points"),
    "calibrate": ("deployq.qat", "calibrate"),
    "freeze_bn_stats": ("deployq.qat", "freeze_bn_stats"),
    "qparams_of": ("deployq.qat", "qparams_of"),
    "set_mode": ("deployq.qat", "set_mode"),
    "QuantSpec": ("deployq.qspec", "QuantSpec"),
}

if TYPE_CHECKING:
    from deployq.api import check, diff, export
    from deployq.diff import DiffReport
    from deployq.export import ExportResult
    from deployq.parity import ParityReport
    from deployq.checkpoint import InputSpec
    from deployq.checkpoint import load as load_checkpoint
    from deployq.checkpoint import save as save_checkpoint
    from deployq.config import QConfig, load_config
    from deployq.prepare import prepare, quant_points
    from deployq.qat import calibrate, freeze_bn_stats, qparams_of, set_mode
    from deployq.qspec import QuantSpec


class _Package(types.ModuleType):
    """The API names resolve to the API objects on first use. A submodule of the same name
    (``deployq.prepare``, ``deployq.export``, ``deployq.diff``) sets the package attribute to itself
    when it is imported, so the names are looked up here first, not in the module's dictionary;
    ``import deployq.export`` and ``from deployq.export import ...`` still reach the module."""

    def __getattribute__(self, name: str) -> Any:
        if name in _API:
            module, attribute = _API[name]
            return getattr(importlib.import_module(module), attribute)
        return super().__getattribute__(name)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(_API))


sys.modules[__name__].__class__ = _Package

__all__ = sorted([*_API, "__version__"])
