"""The float graph of a model that post-training refinement changed, without tracing it again.

AdaRound and bias correction change parameter values (weights, biases, BatchNorm shifts), never
the graph. The export traces the model as it was before them (the float model users compare
against) and would trace the refined model a second time for its QDQ graph: that second
``torch.onnx`` export was most of ``--ptq bias``'s cost on small models. :func:`with_values_of`
writes the refined values into a copy of the first graph instead, where that is exact:

* every changed tensor is found as exactly one initializer holding its old values (same shape and
  type), and no unchanged tensor holds the same values (the exporter shares equal initializers, so
  such an initializer may stand for both); a tensor the exporter folded into another constant (a
  Linear weight transposed for MatMul) is not found;
* the patched graph, run by onnxruntime on seeded random inputs of the example inputs' shapes
  (an all-zero example can leave a detector's outputs at 1e-9, where nothing can be compared),
  gives the refined model's outputs.

Otherwise it returns None and the caller traces the refined model itself.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

from deployq.core.runtime import session
from deployq.deploy.float_graph import export_module
from deployq.exporters.torch_export import ExportModule
from deployq.qat.quantizers import FakeQuantizer

__all__ = ["with_values_of"]


def _key(values: np.ndarray) -> tuple[str, bytes]:
    return values.dtype.str, values.tobytes()


def _float_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The float parameters and buffers the float graph can hold: a weight quantizer's (its scale;
    float mode does not use it) left out."""
    quantizers = tuple(f"{name}." for name, m in module.named_modules() if isinstance(m, FakeQuantizer))
    return {k: t for k, t in module.state_dict().items() if t.is_floating_point() and not k.startswith(quantizers)}


def _changed(before: nn.Module, after: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{name: (old, new)} for the float graph's tensors whose values differ."""
    old, new = _float_tensors(before), _float_tensors(after)
    if old.keys() != new.keys():
        raise ValueError("the refined model's parameters are not the prepared model's")
    return {k: (old[k], new[k]) for k in old if not torch.equal(old[k], new[k])}


def _patched(float_onnx: onnx.ModelProto, before: nn.Module, after: nn.Module) -> Optional[onnx.ModelProto]:
    """A copy of `float_onnx` with each changed tensor's initializer holding its new values, or None."""
    changed = _changed(before, after)
    unchanged = {_key(t.detach().cpu().numpy()) for k, t in _float_tensors(before).items() if k not in changed}
    out = onnx.ModelProto()
    out.CopyFrom(float_onnx)
    by_values: dict[tuple[str, bytes], list[onnx.TensorProto]] = {}
    for init in out.graph.initializer:
        by_values.setdefault(_key(numpy_helper.to_array(init)), []).append(init)
    written: dict[str, bytes] = {}
    for old, new in changed.values():
        old_values, new_values = old.detach().cpu().numpy(), new.detach().cpu().numpy()
        found = by_values.get(_key(old_values), [])
        if len(found) != 1 or tuple(found[0].dims) != old_values.shape or _key(old_values) in unchanged:
            return None
        init = found[0]
        if written.setdefault(init.name, new_values.tobytes()) != new_values.tobytes():
            return None  # two tensors the exporter shared now differ
        init.CopyFrom(numpy_helper.from_array(new_values, init.name))
    return out


def _outputs_agree(model: onnx.ModelProto, before: ExportModule, after: ExportModule,
                   example_inputs: Sequence[torch.Tensor]) -> bool:
    """onnxruntime's outputs of `model` are the refined model's (torch) to within a hundredth of
    what the refinement changed, or a 1e-5 of the output's size where it changed nothing there."""
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randn(x.shape, generator=generator).to(x.dtype) if x.is_floating_point() else x
              for x in example_inputs]
    sess = session(model, optimize=False)
    ours = sess.run(None, {i.name: x.detach().cpu().numpy() for i, x in zip(sess.get_inputs(), inputs)})
    with torch.no_grad():
        old, new = ([t.numpy() for t in m.gm(*inputs)[:m.n_outputs]] for m in (before, after))
    for got, want, was in zip(ours, new, old):
        moved = float(np.abs(want - was).max(initial=0.0))
        allowed = max(0.01 * moved, 1e-5 * float(np.abs(want).max(initial=0.0)))
        if got.shape != want.shape or float(np.abs(got - want).max(initial=0.0)) > allowed:
            return False
    return True


def with_values_of(float_onnx: onnx.ModelProto, before: nn.Module, after: nn.Module,
                   example_inputs: Sequence[torch.Tensor]) -> Optional[onnx.ModelProto]:
    """`float_onnx`, the float graph exported from the prepared model `before`, with the values
    `after` (the same model after AdaRound / bias correction) holds; None where that is not exact.
    Only the float graphs' tensors count (a quantizer's scale is not in them)."""
    graphs = [export_module(m) for m in (before, after)]
    patched = _patched(float_onnx, graphs[0].gm, graphs[1].gm)
    if patched is None or not _outputs_agree(patched, *graphs, example_inputs):
        return None
    return patched
