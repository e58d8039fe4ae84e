"""Capture: a float nn.Module -> a torch.fx GraphModule deployq can place quant points in.

Two ways, tried in order:

* **Symbolic torch.fx** (:func:`deployq.qat.trace.trace`): module calls stay ``call_module`` nodes,
  leaf modules are honoured, the model keeps every input shape it accepts.
* **Nothing to capture** for a model imported from ONNX (:mod:`deployq.qat.onnx_import`): its
  graph was written node by node, each node carrying the ONNX tensor it computes.
* **torch.export** (non-strict, then strict as torch.onnx tries them; the path PyTorch's own PT2E
  quantization takes), when symbolic
  tracing fails on Python control flow (``if x.shape[-1] != w``, ``len(x)``, ``x.device.type``).
  Branches that depend on shapes are specialized to the example input (the batch stays dynamic,
  height and width are fixed); the graph is functionalized ATen. Its ops keep the module path they
  ran in (``nn_module_stack``), so quant-point names are module paths as with fx, and
  :mod:`deployq.qat.normalize` turns the layers' ATen calls back into their modules.

A model neither can capture is a :class:`CaptureError` naming the module symbolic tracing stopped
in and the two ways to keep it whole (``--leaf MODULE`` on the command line, ``leaf_modules:`` in
the YAML config).
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from deployq.qat.onnx_import import is_imported, sizes_fixed
from deployq.qat.trace import TraceError, trace

__all__ = ["CaptureError", "Captured", "capture"]

FX, EXPORT, ONNX = "fx", "torch.export", "onnx"
ONNX_FIXED = "onnx, sizes fixed"  # an imported graph with sizes read from shapes folded to constants


class CaptureError(TraceError):
    """Neither symbolic torch.fx nor torch.export could capture the model."""


@dataclass
class Captured:
    gm: fx.GraphModule
    method: str  # FX or EXPORT
    notes: list[str]


def capture(model: nn.Module, example_inputs: Sequence[torch.Tensor], leaf_modules: Iterable[Any] = (),
            concrete_args: Optional[dict] = None) -> Captured:
    """The fx graph of `model`: symbolic tracing, else torch.export (see the module docstring).

    Leaf modules are only honoured by symbolic tracing: with leaves given, torch.export is not
    tried (it would inline them)."""
    leaf_modules = tuple(leaf_modules)
    _check_leaf_names(model, leaf_modules)
    if isinstance(model, fx.GraphModule) and is_imported(model.graph):  # written node by node: nothing to trace
        fixed = sizes_fixed(model.graph)
        return Captured(model, ONNX_FIXED if fixed else ONNX, [
            "imported from ONNX; sizes the graph reads from its input's shape are fixed at the input shape given"
        ] if fixed else [])
    try:
        return Captured(trace(model, leaf_modules, {**_optional_arguments(model), **(concrete_args or {})}), FX, [])
    except TraceError as fx_error:
        if leaf_modules or concrete_args:
            raise
        failed_fx = fx_error
    try:
        gm = export_capture(model, example_inputs)
    except Exception as err:  # noqa: BLE001 - every failure becomes the one error below
        where = getattr(failed_fx, "module", None)
        fix = (f"keep {where!r} whole (called as a black box, quantized at its inputs and output): "
               f"--leaf {where} on the command line, or leaf_modules: [{where}] in the YAML config "
               f"(leaf_modules=[{where!r}] in Python)" if where else
               "move the data-dependent control flow out of forward()")
        raise CaptureError(
            f"cannot capture {type(model).__name__}: symbolic torch.fx stopped at {failed_fx.what} "
            f"({failed_fx.reason}), and torch.export failed too: {_first_line(err)}\nFix: {fix}.",
            module=where) from err
    note = (f"captured with torch.export (symbolic torch.fx stopped at {failed_fx.what}: {failed_fx.reason}); "
            "shape-dependent branches follow the example input: height and width are fixed")
    return Captured(gm, EXPORT, [note])


def _optional_arguments(model: nn.Module) -> dict[str, Any]:
    """forward()'s optional arguments (``attn_mask=None``, ``is_causal=False``) at their defaults:
    the model is deployed with its required inputs only, and a branch on an optional argument
    is traced the way the default takes it."""
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return {}
    return {p.name: p.default for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.default is not p.empty and isinstance(p.default, (type(None), bool, int, float, str))}


def _check_leaf_names(model: nn.Module, leaf_modules: tuple[Any, ...]) -> None:
    """Every leaf given by name is a module path or a module class name of `model`."""
    paths = {path for path, _ in model.named_modules() if path}
    classes = {type(m).__name__ for m in model.modules()}
    for name in leaf_modules:
        if isinstance(name, str) and name not in paths and name not in classes:
            close = difflib.get_close_matches(name, sorted(paths | classes), n=3, cutoff=0.5)
            hint = f" (nearest: {', '.join(close)})" if close else ""
            raise CaptureError(f"leaf module {name!r} is neither a module path nor a module class of "
                               f"{type(model).__name__}{hint}", module=None)


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _batch_of_two(t: Any) -> Any:
    """torch.export specializes a size-1 dimension to the constant 1 wherever the model reshapes
    with it, so the batch is traced at 2 (and kept dynamic)."""
    return torch.cat([t[:1], t[:1]]) if isinstance(t, torch.Tensor) and t.ndim > 0 else t


def export_capture(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """`model` captured by torch.export (eval mode, batch dynamic), as a plain fx GraphModule:
    flat positional inputs, the model's own output structure, parameters and buffers at their
    module paths (the model's own objects), no guard or assertion nodes."""
    training = model.training
    model.eval()
    examples = tuple(_batch_of_two(t) for t in example_inputs)
    dynamic = tuple({0: torch.export.Dim.AUTO} if isinstance(t, torch.Tensor) and t.ndim > 0 else None
                    for t in examples)
    quiet = logging.getLogger("torch")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                program = torch.export.export(model, examples, dynamic_shapes=dynamic, strict=False)
            except Exception:  # as torch.onnx does: non-strict first, then strict (TorchDynamo)
                program = torch.export.export(model, examples, dynamic_shapes=dynamic, strict=True)
            program = program.run_decompositions({})  # functional ATen, no op decomposed
    finally:
        quiet.setLevel(level)
        model.train(training)
    return _plain_graph_module(program, model)


def _plain_graph_module(program: torch.export.ExportedProgram, model: nn.Module) -> fx.GraphModule:
    unlifted = program.module()
    graph = unlifted.graph
    out_spec = unlifted._out_spec  # the model's output structure (a tensor, a tuple, a dict, ...)
    graph.set_codegen(fx.graph.CodeGen())
    for node in list(graph.nodes):
        if node.op == "call_module" and not node.users:  # torch.export's input guards
            graph.erase_node(node)
        elif node.op == "call_function" and _is_assertion(node) and not node.users:
            graph.erase_node(node)
        elif node.op == "call_function" and node.target in _VIEWS:
            # traced on fake tensors whose strides may differ from eager execution's (a view of a
            # permuted attention output): a reshape is the same value, and never fails
            node.target = torch.ops.aten.reshape.default
    output = next(n for n in graph.nodes if n.op == "output")
    flat = output.args[0]
    output.args = (pytree.tree_unflatten(list(flat), out_spec),)
    attributes: dict[str, Any] = {}
    for node in graph.nodes:
        if node.op in ("get_attr", "call_module"):
            attributes[str(node.target)] = _attribute(model, unlifted, str(node.target))
    gm = fx.GraphModule(attributes, graph, type(model).__name__)
    _call_leaf_modules(gm, model)
    gm.graph.lint()
    gm.recompile()
    return gm


def _innermost_call(node: fx.Node) -> Optional[tuple[str, str]]:
    """(call key, module path) of the innermost module call `node` ran in; repeated calls of one
    module have keys of their own (``L__self__act@1``)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return None
    key, (path, _) = next(reversed(stack.items()))
    return key, path


def _call_leaf_modules(gm: fx.GraphModule, model: nn.Module) -> None:
    """Each call of a module symbolic fx keeps whole (torch.nn's own: Conv2d, ReLU, LayerNorm, ...)
    becomes a ``call_module`` of that module again, as fx would have recorded it: one graph, one
    vocabulary and one set of names whichever way the model was captured. A call is replaced
    only when its ATen ops read one tensor from outside (besides the module's own parameters)
    and give one tensor back."""
    leaf_rule = fx.Tracer()
    calls: dict[str, list[fx.Node]] = {}
    paths: dict[str, str] = {}
    for node in gm.graph.nodes:
        where = _innermost_call(node) if node.op == "call_function" else None
        if where is not None and where[1]:
            calls.setdefault(where[0], []).append(node)
            paths[where[0]] = where[1]
    for key, nodes in calls.items():
        path = paths[key]
        try:
            module = model.get_submodule(path)
        except AttributeError:  # a hook torch.export ran the op in, not a module of the model
            continue
        if not leaf_rule.is_leaf_module(module, path):
            continue
        inside = set(nodes)
        external = {a for n in nodes for a in n.all_input_nodes if a not in inside
                    and not (a.op == "get_attr" and str(a.target).startswith(f"{path}."))}
        results = [n for n in nodes if any(u not in inside for u in n.users)]
        if len(external) != 1 or len(results) != 1:
            continue
        gm.add_submodule(path, module)
        with gm.graph.inserting_before(results[0]):
            call = gm.graph.call_module(path, (external.pop(),))
        call.meta = dict(results[0].meta)
        results[0].replace_all_uses_with(call)
        for n in reversed(nodes):
            gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()


def _attribute(model: nn.Module, unlifted: nn.Module, target: str) -> Any:
    """The model's own parameter or buffer at `target` (so the prepared model shares it), or the
    constant torch.export lifted there."""
    for owner in (model, unlifted):
        try:
            value: Any = owner
            for atom in target.split("."):
                value = getattr(value, atom)
            return value
        except AttributeError:
            continue
    raise CaptureError(f"torch.export refers to {target!r}, which the model does not have")


_VIEWS = (torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


def _is_assertion(node: fx.Node) -> bool:
    name = getattr(node.target, "__name__", "") or str(node.target)
    return "assert" in name
