"""The rewrite pipeline: float ONNX -> (folded float ONNX, QDQ ONNX).

    fold_bn  ->  global_pool  ->  [float model out]  ->  insert_qdq  ->  cleanup

Where the quant points are (which activation a layer absorbs, what carries quantization) was decided
once, when the torch model was prepared; the records say it, and the passes follow them. Nothing
here re-derives placement from the ONNX graph, so the two cannot disagree.

A device profile (:mod:`deployq.deploy.devices`) may add ``depth_to_space`` (ConvTranspose with kernel =
stride as Conv + DepthToSpace) to both models, so that they still share every tensor name.

Each pass is its own module and is tested alone; this file only runs them in order and collects
their logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import onnx
import onnx_graphsurgeon as gs

from deployq.exporters.cleanup import cleanup, finalize
from deployq.exporters.depth_to_space import convtranspose_to_depth_to_space
from deployq.exporters.fold_bn import fold_batchnorm_pass
from deployq.exporters.global_pool import spatial_mean_to_global_pool
from deployq.exporters.graph import PassLog, to_model, write_layouts
from deployq.exporters.insert_qdq import insert_qdq
from deployq.core.qparams import QuantPoint


@dataclass
class Rewritten:
    float_model: onnx.ModelProto
    quant_model: Optional[onnx.ModelProto]
    log: PassLog = field(default_factory=PassLog)


def rewrite(model: onnx.ModelProto, records: Optional[dict[str, QuantPoint]], opset: int = 21,
            block_convtranspose: bool = False, carry_bits: int = 8) -> Rewritten:
    """Fold BN (the float model); then insert Q/DQ if `records` are given.
    `block_convtranspose`: rewrite ConvTranspose (kernel = stride) as Conv + DepthToSpace in both;
    `carry_bits`: the widest codes carried through data movement (:func:`insert_qdq`)."""
    log = PassLog()
    graph = gs.import_onnx(model)
    keep = {r.name for r in (records or {}).values() if r.kind != "weight"}
    fold_batchnorm_pass(graph, keep, log)
    spatial_mean_to_global_pool(graph, log)
    float_graph = cleanup(graph, log).copy()
    float_log = log if records is None else PassLog()  # logged once: for the QDQ graph when there is one
    if block_convtranspose:
        convtranspose_to_depth_to_space(float_graph, float_log, keep if records else None)
    float_model = finalize(to_model(float_graph, opset))
    write_layouts(float_model, float_log.layouts)
    if records is None:
        return Rewritten(float_model, None, log)
    insert_qdq(graph, records, log, carry_bits)
    if block_convtranspose:
        convtranspose_to_depth_to_space(cleanup(graph, log), log, keep)
    quant_model = finalize(to_model(cleanup(graph, log), opset))
    write_layouts(quant_model, log.layouts)
    return Rewritten(float_model, quant_model, log)


def fold_batchnorm_copy(model: onnx.ModelProto, keep: Iterable[str] = ()) -> onnx.ModelProto:
    """A copy of `model` with its BatchNormalizations folded as the rewriter folds them, the opset
    kept: what diff compares a QDQ model against. `keep`: the QDQ model's quant points, as in
    :func:`rewrite` (a BN whose output is one stays, and is not folded into the next Conv)."""
    graph = fold_batchnorm_pass(gs.import_onnx(model), keep)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 21)
    folded = to_model(graph, opset)
    folded.metadata_props.extend(model.metadata_props)  # the layout records (names kept by the fold)
    return folded
