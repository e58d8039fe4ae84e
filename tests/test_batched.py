"""Running a prepared model on groups of stacked inputs (deployq.ptq.batched)."""

import torch

from deployq.ptq.batched import model_outputs, run_node_by_node, stack_groups, stacked


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = torch.relu(self.conv(x))
        return self.head(y), y.mean((2, 3))


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(1, 3, 8, 8, generator=g),) for _ in range(10)] + [(torch.rand(2, 3, 6, 6, generator=g),)]


def test_groups_stack_equal_shapes_up_to_eight_samples():
    groups = stack_groups(_inputs())
    assert [sum(a[0].shape[0] for a in g) for g in groups] == [8, 2, 2]
    assert stacked(groups[0])[0].shape == (8, 3, 8, 8) and stacked(groups[2])[0].shape == (2, 3, 6, 6)


def test_node_by_node_gives_the_forward_of_each_group_bit_for_bit():
    model = torch.fx.symbolic_trace(Net().eval())
    groups = [stacked(g) for g in stack_groups(_inputs())]
    with torch.no_grad():
        ours = run_node_by_node(model, groups, {})
        theirs = [model(*g) for g in groups]
    assert all(torch.equal(a, b) for o, t in zip(ours, theirs) for a, b in zip(o, t))
    assert len(model_outputs(model, _inputs())) == 3


def test_a_chosen_layer_sees_every_group_before_any_later_node_runs():
    """The function of a layer gets its input for all groups at once, and what it returns is what
    every later node reads."""
    model = torch.fx.symbolic_trace(Net().eval())
    groups = [stacked(g) for g in stack_groups(_inputs())]
    seen = []

    def head(inputs):
        seen.append([x.shape[0] for x in inputs])
        return [torch.zeros(x.shape[0], 2, *x.shape[2:]) for x in inputs]

    with torch.no_grad():
        outputs = run_node_by_node(model, groups, {"head": head})
    assert seen == [[8, 2, 2]]
    assert all(float(out[0].abs().sum()) == 0 for out in outputs)
    assert run_node_by_node(model, groups, {"nowhere": head}) is None  # a path the graph never calls
