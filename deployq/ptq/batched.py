"""Running a prepared model on many calibration inputs at once, for the post-training methods.

Consecutive inputs of equal shapes are stacked into one batch of at most :data:`STACKED_SAMPLES`
samples (:func:`stack_groups`): one forward per group instead of one per input. Two ways to run
the groups:

* :func:`model_outputs` runs each group through the model (the scores of the calibration search
  and of the held-out check);
* :func:`run_node_by_node` runs every node of the traced graph on every group before the next
  node, and hands a chosen layer's inputs of *all* groups to a function that computes its value
  (bias correction: a layer's correction is measured on every sample before any later layer
  reads its output). Each group's tensors have the size of a group, not of the whole set: on
  PP-OCR's text detector (32 pages of 384 x 384) one forward of all 32 stacked took 4.3 s, 2.6 s
  of it in the kernel mapping fresh pages for tensors too large for the allocator to reuse,
  against 2.5 s for the same forward node by node over groups of 8.

A group's outputs are the same, bit for bit, whichever of the two ran it (same operations on the
same stacked tensors), except where a chosen layer's function computes its value differently.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import torch
from torch import fx

STACKED_SAMPLES = 8  # inputs run as one batch (their outputs summed over, not read one by one)


def stack_groups(inputs: Sequence[tuple]) -> list[list[tuple]]:
    """Consecutive inputs whose tensors have the same shapes past the batch dimension, grouped
    up to :data:`STACKED_SAMPLES` samples; anything else starts a new group."""
    groups: list[list[tuple]] = []
    for args in inputs:
        if groups and _stacks_with(groups[-1], args):
            groups[-1].append(args)
        else:
            groups.append([args])
    return groups


def _stacks_with(group: list[tuple], args: tuple) -> bool:
    first = group[0]
    return (len(args) == len(first) and all(isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.ndim > 0
                                            and a.shape[1:] == b.shape[1:] and a.dtype == b.dtype
                                            for a, b in zip(args, first))
            and sum(int(a[0].shape[0]) for a in group) + int(args[0].shape[0]) <= STACKED_SAMPLES)


def stacked(group: Sequence[tuple]) -> tuple:
    """The group's inputs as one batch (the input itself where the group holds one)."""
    return tuple(group[0]) if len(group) == 1 else tuple(torch.cat(parts) for parts in zip(*group))


def model_outputs(model: Callable[..., Any], inputs: Sequence[tuple]) -> list[list[torch.Tensor]]:
    """The model's output tensors (float64) for the inputs: one list per group run. A model that
    refuses a stacked group gets its inputs one by one. What reads these lists sums over them, so
    how the inputs were grouped does not matter, as long as the reference and the values are
    grouped alike (the held-out check of the low-light model went 3.5 -> 1.4 s)."""
    with torch.no_grad():
        return [output_tensors(result) for group in stack_groups(list(inputs)) for result in _run_group(model, group)]


def _run_group(model: Callable[..., Any], group: list[tuple]) -> Iterable[Any]:
    if len(group) > 1:
        try:
            yield model(*stacked(group))
            return
        except (RuntimeError, ValueError, IndexError):
            pass  # a model written for one batch size: input by input
    for args in group:
        yield model(*args)


def output_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, tuple, list or dict of them), detached, float64."""
    if isinstance(value, torch.Tensor):
        return [value.detach().double()]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in output_tensors(v)]
    return []


LayerFunction = Callable[[list[torch.Tensor]], list[torch.Tensor]]


def run_node_by_node(model: fx.GraphModule, groups: Sequence[tuple],
                     layers: Mapping[str, LayerFunction]) -> Optional[list[Any]]:
    """Run `model` on every group of positional inputs, each node of its graph on every group
    before the next node; the model's output for each group. At the first call of a module whose
    path is in `layers`, ``layers[path]`` gets that call's first argument for every group and
    returns the call's value for every group, in place of calling the module. None where a path
    of `layers` is not called by the graph (nothing else is run after that is known)."""
    nodes = list(model.graph.nodes)
    if not set(layers) <= {str(n.target) for n in nodes if n.op == "call_module"}:
        return None
    last_use: dict[fx.Node, fx.Node] = {}
    for node in reversed(nodes):
        for used in node.all_input_nodes:
            last_use.setdefault(used, node)
    runner = fx.Interpreter(model)
    envs: list[dict[fx.Node, Any]] = [{} for _ in groups]
    placeholders = iter(range(len(nodes)))
    done: set[str] = set()
    outputs: list[Any] = []
    for node in nodes:
        if node.op == "placeholder":
            index = next(placeholders)
            for env, group in zip(envs, groups):
                env[node] = group[index] if index < len(group) else node.args[0]  # a default value
        elif node.op == "output":
            outputs = [fx.node.map_arg(node.args[0], lambda n, env=env: env[n]) for env in envs]
        elif node.op == "call_module" and str(node.target) in layers and str(node.target) not in done:
            done.add(str(node.target))
            values = layers[str(node.target)]([env[node.args[0]] for env in envs])
            for env, value in zip(envs, values):
                env[node] = value
        else:
            for env in envs:
                runner.env = env
                env[node] = runner.run_node(node)
        for used in node.all_input_nodes:  # free what no later node reads
            if last_use[used] is node:
                for env in envs:
                    env.pop(used, None)
    return outputs
