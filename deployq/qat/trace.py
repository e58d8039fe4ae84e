"""The first steps of :func:`deployq.prepare`: trace a model with torch.fx, take its in-place ops out,
give every call site of a reused module its own copy, and run it once on example inputs to record
shapes (and which ops return views of their input).

* **Trace** with a tracer whose leaf modules are configurable; a failure names the module.
* **In place** ops (``ReLU(inplace=True)``, ``x += y``, ``F.relu_``) become their out-of-place forms,
  so that a quantizer can sit between an op and its reader.
* **De-duplicate**: a module called at several places gets one copy per call site, named as the
  seeds name them (``lrelu``, ``lrelu_dup1``, ...). Copies share parameters and buffers, so the
  model computes what it computed before, but each call site has its own name and quantizer.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import io
from collections import Counter
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from deployq.qat.fx_ops import ALIAS

__all__ = ["TraceError", "dedupe_modules", "propagate_shapes", "remove_inplace", "trace"]


class TraceError(RuntimeError):
    """torch.fx could not trace the model; the message names the module and the fix.

    `module`: the path of the module tracing stopped in ('' for the model itself); `what` names it
    with its type, `reason` is the tracer's own message (first line)."""

    def __init__(self, message: str, *, module: Optional[str] = None, what: str = "", reason: str = "") -> None:
        super().__init__(message)
        self.module = module
        self.what = what
        self.reason = reason


class _Tracer(fx.Tracer):
    def __init__(self, leaf_modules: Iterable[Any]) -> None:
        super().__init__()
        self.leaf_names = {m for m in leaf_modules if isinstance(m, str)}
        self.leaf_types = tuple(m for m in leaf_modules if isinstance(m, type))
        self.failed_at: Optional[str] = None

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if qualname in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        if self.leaf_types and isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Any, args: Any, kwargs: Any) -> Any:
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_at is None:
                self.failed_at = self.path_of_module(m)
            raise


def trace(model: nn.Module, leaf_modules: Iterable[Any] = (), concrete_args: Optional[dict] = None) -> fx.GraphModule:
    tracer = _Tracer(leaf_modules)
    try:
        graph = tracer.trace(model, concrete_args)
    except Exception as err:
        where = tracer.failed_at
        what = f"module {where!r} ({type(model.get_submodule(where)).__name__})" if where else type(model).__name__
        fix = (f"keep it whole as a leaf, called as a black box and quantized at its boundary (--leaf {where} "
               f"on the command line, leaf_modules: [{where}] in the YAML config, leaf_modules=[{where!r}] in "
               "Python), "
               if where else "")
        reason = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
        raise TraceError(
            f"torch.fx could not trace {what}: {type(err).__name__}: {err}\n"
            f"Fix: {fix}pass concrete_args for arguments that drive Python control flow, or move "
            "data-dependent control flow out of forward().", module=where, what=what, reason=reason
        ) from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


_INPLACE_FUNCTIONS = {F.relu_: F.relu, torch.relu_: torch.relu, F.elu_: F.elu, F.leaky_relu_: F.leaky_relu,
                      F.hardtanh_: F.hardtanh, torch.sigmoid_: torch.sigmoid, torch.tanh_: torch.tanh}


def _inplace_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Rewrite `node` to compute out of place if it writes into its first argument; True if it did."""
    if node.op == "call_module":
        m = modules[node.target]
        if getattr(m, "inplace", False) is True:
            m.inplace = False
            return True
        return False
    if node.op == "call_function":
        if node.target in _INPLACE_FUNCTIONS:
            node.target = _INPLACE_FUNCTIONS[node.target]
            return True
        return _functional_inplace_off(node)
    if node.op == "call_method":
        name = str(node.target)
        if name.endswith("_") and not name.endswith("__") and hasattr(torch.Tensor, name[:-1]):
            node.target = name[:-1]
            return True
    return False


def _functional_inplace_off(node: fx.Node) -> bool:
    """``F.relu(x, inplace=True)``, or ``inplace`` given by position: set it to False."""
    if node.kwargs.get("inplace") is True:
        node.kwargs = {**node.kwargs, "inplace": False}
        return True
    try:
        params = list(inspect.signature(node.target).parameters)
    except (TypeError, ValueError):
        return False
    if "inplace" not in params:
        return False
    index = params.index("inplace")
    if len(node.args) > index and node.args[index] is True:
        node.args = (*node.args[:index], False, *node.args[index + 1:])
        return True
    return False


def remove_inplace(gm: fx.GraphModule) -> int:
    """Make every in-place op (``ReLU(inplace=True)``, ``F.relu(x, inplace=True)``, ``x.add_(y)``)
    compute out of place, and let later readers of the overwritten tensor read the result instead.

    This is what eager execution computes, without aliasing: a quantizer's output is never
    overwritten by the activation after it, and the exported graph gets one tensor per value
    (an in-place op would make a layer's output and its activation's output the same tensor).
    Returns the number of ops rewritten.
    """
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    count = 0
    for node in list(gm.graph.nodes):
        if not _inplace_node(node, modules):
            continue
        count += 1
        target = node.args[0] if node.args else None
        if isinstance(target, fx.Node):
            target.replace_all_uses_with(node, delete_user_cb=lambda user: order[user] > order[node])
    if count:
        gm.recompile()
    return count


def dedupe_modules(gm: fx.GraphModule) -> dict[str, str]:
    """Give every call site of a reused module its own copy (``name_dupN``); returns new -> original."""
    calls: Counter[str] = Counter()
    renamed: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        target = node.target
        calls[target] += 1
        if calls[target] == 1:
            continue
        parent_path, _, leaf = target.rpartition(".")
        parent = gm.get_submodule(parent_path) if parent_path else gm
        module = gm.get_submodule(target)
        shared = {id(t): t for t in list(module.parameters()) + list(module.buffers())}
        index = calls[target] - 1
        while hasattr(parent, f"{leaf}_dup{index}"):
            index += 1
        new_leaf = f"{leaf}_dup{index}"
        parent.add_module(new_leaf, copy.deepcopy(module, shared))
        node.target = f"{parent_path}.{new_leaf}" if parent_path else new_leaf
        renamed[node.target] = target
    gm.recompile()
    return renamed


class _ShapeProp(ShapeProp):
    """torch's ShapeProp, remembering the node it runs (to name it when one fails)."""

    node: Optional[fx.Node] = None

    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        result = super().run_node(n)
        if isinstance(result, torch.Tensor) and n.op != "placeholder" and result.untyped_storage().nbytes():
            storage = result.untyped_storage().data_ptr()
            inputs = [self.env.get(a) for a in n.all_input_nodes]
            if any(isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() == storage for t in inputs):
                n.meta[ALIAS] = True  # a view of its input: carries quantization (fx_ops)
        return result


def propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    modes = {m: m.training for m in gm.modules()}
    gm.eval()
    prop = _ShapeProp(gm)
    try:
        # ShapeProp prints a traceback to stderr before it raises; the error below says it all
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()):
            prop.propagate(*example_inputs)
    except Exception as err:
        cause = err.__cause__ or err
        where = ""
        if prop.node is not None:
            stack = prop.node.meta.get("nn_module_stack") or {}
            module = next(reversed(stack.values()))[0] if stack else ""
            where = f" at {prop.node.name!r}" + (f" (in module {module!r})" if module else "")
        raise ValueError(
            f"running the traced model on example inputs of shape {[tuple(t.shape) for t in example_inputs]} "
            f"failed{where}: {type(cause).__name__}: {str(cause).rstrip('.')}. Check the input shape "
            "(--input-shape): its channels, and sizes that every down-sampling step divides"
        ) from err
    finally:
        for m, training in modes.items():
            m.train(training)
