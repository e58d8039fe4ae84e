"""The rewrite pipeline: float ONNX -> (folded float ONNX, QDQ ONNX).

    fold_bn  ->  fuse_activation (groups)  ->  [float model out]  ->  insert_qdq  ->  cleanup

Each pass is its own module and is tested alone; this file only runs them in order and collects
their logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import onnx
import onnx_graphsurgeon as gs

from deployq.exporters.cleanup import cleanup, finalize
from deployq.exporters.fold_bn import fold_batchnorm_pass
from deployq.exporters.fuse_activation import find_fused_groups
from deployq.exporters.graph import PassLog, to_model
from deployq.exporters.insert_qdq import insert_qdq
from deployq.qparams import QParams


@dataclass
class Rewritten:
    float_model: onnx.ModelProto
    quant_model: Optional[onnx.ModelProto]
    log: PassLog = field(default_factory=PassLog)


def rewrite(model: onnx.ModelProto, records: Optional[dict[str, QParams]], fuse_activations: Iterable[str],
            opset: int = 21) -> Rewritten:
    """Fold BN and group activations (the float model); then insert Q/DQ if `records` are given."""
    log = PassLog()
    graph = gs.import_onnx(model)
    keep = {r.name for r in (records or {}).values() if r.kind != "weight"}
    fold_batchnorm_pass(graph, keep, log)
    groups = find_fused_groups(graph, fuse_activations, log)
    float_model = finalize(to_model(cleanup(graph, log).copy(), opset))
    if records is None:
        return Rewritten(float_model, None, log)
    insert_qdq(graph, records, groups, log)
    return Rewritten(float_model, finalize(to_model(cleanup(graph, log), opset)), log)
