"""The ONNX side: torch -> ONNX conversion, graph helpers with the op vocabulary, and the rewrite
passes (one module per pass, run in order by :mod:`.rewriter`).

This package imports only deployq's bottom layer (:mod:`deployq.core`). The verify stage reads
graphs through :mod:`.graph` and the names re-exported here, never through a pass module.
"""

from deployq.exporters.rewriter import Rewritten, fold_batchnorm_copy, rewrite

__all__ = ["Rewritten", "fold_batchnorm_copy", "rewrite"]
