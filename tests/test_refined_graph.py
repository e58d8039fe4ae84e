"""The refined model's float graph from the prepared model's, without a second trace
(deployq.deploy.refined_graph): exact where it is used, refused where it could not be."""

import copy

import onnx
import torch
from torch import nn

import deployq
from deployq.deploy import refined_graph
from deployq.deploy.float_graph import export_float
from deployq.exporters.torch_export import clear_export_cache
from deployq.ptq.bias_correction import correct_bias
from ptq_models import calibrated


def _batches(seed: int, n: int = 4) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(4, 3, 16, 16, generator=g) for _ in range(n)]


def _refined(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    after = copy.deepcopy(model)
    correct_bias(after, _batches(1), reference=model)
    return after


def _traced(model: torch.fx.GraphModule, x: torch.Tensor) -> onnx.ModelProto:
    clear_export_cache()
    return export_float(model, (x,))


def test_the_patched_graph_is_the_refined_models_own_export():
    """Bias correction's values written into the prepared model's graph give, byte for byte, the
    graph a second trace of the corrected model gives."""
    before = calibrated(_batches(0)).eval()
    after = _refined(before)
    x = _batches(2, 1)[0][:1]
    patched = refined_graph.with_values_of(_traced(before, x), before, after, (x,))
    assert patched is not None
    assert patched.SerializeToString() == _traced(after, x).SerializeToString()
    assert patched.SerializeToString() != _traced(before, x).SerializeToString()  # something was corrected


class _TwinNorms(nn.Module):
    """Two Conv + BatchNorm layers whose BatchNorms start equal (fresh): the exporter keeps one
    initializer for each of their equal tensors."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.a_bn, self.b_bn = nn.BatchNorm2d(4), nn.BatchNorm2d(4)

    def forward(self, x):
        return torch.relu(self.a_bn(self.a(x))) + torch.relu(self.b_bn(self.b(x)) * 0.5)


def test_a_value_the_exporter_may_have_shared_is_not_patched(monkeypatch):
    """Refused by the rule itself (the output check is switched off here)."""
    monkeypatch.setattr(refined_graph, "_outputs_agree", lambda *args: True)
    x = _batches(3, 1)[0][:1]
    before = deployq.prepare(_TwinNorms().eval(), x)
    deployq.calibrate(before, _batches(0), progress=False)
    after = copy.deepcopy(before)
    with torch.no_grad():
        after.get_submodule("a").bn.bias.add_(0.1)  # one of the twins changes, the other does not
    assert refined_graph.with_values_of(_traced(before, x), before, after, (x,)) is None


def test_a_patch_that_misses_a_value_is_caught_by_the_outputs(monkeypatch):
    """Planted: the patch writes nothing. The patched graph then computes the prepared model's
    outputs, not the refined one's, and is refused."""
    before = calibrated(_batches(0)).eval()
    after = _refined(before)
    x = _batches(2, 1)[0][:1]
    monkeypatch.setattr(refined_graph, "_patched", lambda graph, old, new: copy.deepcopy(graph))
    assert refined_graph.with_values_of(_traced(before, x), before, after, (x,)) is None
