"""Normalize a captured graph, so that placing quant points does not depend on how a model is written.

After capture (:mod:`deployq.qat.capture`) and shape propagation, three passes, each a
``GraphModule -> count`` function:

* :func:`lift_layers` - a convolution, linear layer or BatchNorm computed by a function on a
  module's own parameters (a ``BatchNorm2d`` subclass that applies its own activation, a Conv2d
  subclass that pads first, every layer of a graph from torch.export) becomes a call of a plain
  ``torch.nn`` module at that module's path, sharing its parameters. Layers are then recognized by
  what they compute, not by their class, and the BatchNorm follows the model's train / eval mode
  instead of the mode it was traced in.
* :func:`remove_noops` - ops that return their input unchanged: ``nn.Identity`` (a disabled
  DropBlock), dropout with p = 0 or in eval form, ``detach``, a reshape or flatten to the shape
  the tensor already has, ``x + 0`` and ``x * 1`` (a branch or a scale at its default), a
  concatenation with empty tensors. A no-op between a layer and its
  activation would hide the pair; one after a classifier would give the exported graph an
  ``Identity`` output.
* :func:`remove_assertions` - run-time checks of a tensor's rank or shape (``torch._assert``, as
  timm's BatchNormAct2d checks its input is 4-D): they are a second reader of a layer's output
  that would keep the layer from its BatchNorm, and ONNX has no place for them.
* :func:`remove_dead_code` - pure nodes nobody reads (e.g. a BatchNorm subclass's update of its
  batch counter, once the BatchNorm is a module again).
"""

from __future__ import annotations

import operator
from typing import Any, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from deployq.qat.capture import Captured, capture
from deployq.qat.fx_ops import aten_name
from deployq.qat.trace import propagate_shapes, remove_inplace

__all__ = ["lift_layers", "normalized_graph", "remove_assertions", "remove_dead_code", "remove_noops"]

# positional parameter names of the functional forms of the layers
_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONVOLUTION = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")
_LINEAR = ("input", "weight", "bias")
_F_BN = ("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps")
_TORCH_BN = ("input", "weight", "bias", "running_mean", "running_var", "training", "momentum", "eps")
_NATIVE_BN = ("input", "weight", "bias", "running_mean", "running_var", "momentum", "eps")

_FUNCTION_FORMS = {
    F.conv1d: ("conv", _CONV), F.conv2d: ("conv", _CONV), F.conv3d: ("conv", _CONV),
    F.conv_transpose1d: ("conv_t", _CONV_T), F.conv_transpose2d: ("conv_t", _CONV_T),
    F.conv_transpose3d: ("conv_t", _CONV_T), F.linear: ("linear", _LINEAR),
    F.batch_norm: ("bn", _F_BN), torch.batch_norm: ("bn", _TORCH_BN),
}
_ATEN_FORMS = {
    "conv1d": ("conv", _CONV), "conv2d": ("conv", _CONV), "conv3d": ("conv", _CONV),
    "conv_transpose1d": ("conv_t", _CONV_T), "conv_transpose2d": ("conv_t", _CONV_T),
    "conv_transpose3d": ("conv_t", _CONV_T), "convolution": ("convolution", _CONVOLUTION),
    "linear": ("linear", _LINEAR), "batch_norm": ("bn", _TORCH_BN),
    "_native_batch_norm_legit_no_training": ("native_bn", _NATIVE_BN),
}
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
_BNS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}
_ROLES = {"conv": ("weight", "bias"), "conv_t": ("weight", "bias"), "convolution": ("weight", "bias"),
          "linear": ("weight", "bias"), "bn": ("weight", "bias", "running_mean", "running_var"),
          "native_bn": ("weight", "bias", "running_mean", "running_var")}


def _form(node: fx.Node) -> Optional[tuple[str, tuple[str, ...]]]:
    if node.op != "call_function":
        return None
    if node.target in _FUNCTION_FORMS:
        return _FUNCTION_FORMS[node.target]
    return _ATEN_FORMS.get(aten_name(node.target) or "")


def _bind(node: fx.Node, names: tuple[str, ...]) -> dict[str, Any]:
    bound = dict(zip(names, node.args))
    bound.update(node.kwargs)
    return bound


def _owner(bound: dict[str, Any], roles: tuple[str, ...]) -> Optional[str]:
    """The module path P whose attributes P.weight, P.bias, ... are the layer's parameters, if every
    parameter argument is a get_attr of P's attribute of that role's name (or absent)."""
    owners = set()
    for role in roles:
        value = bound.get(role)
        if value is None:
            continue
        if not isinstance(value, fx.Node) or value.op != "get_attr":
            return None
        path, _, attribute = str(value.target).rpartition(".")
        if attribute != role or not path:
            return None
        owners.add(path)
    return owners.pop() if len(owners) == 1 else None


def _tuple(value: Any, n: int) -> Any:
    return value if isinstance(value, str) else tuple(value) if isinstance(value, (list, tuple)) else (value,) * n


def _twin(kind: str, bound: dict[str, Any], tensors: dict[str, Optional[torch.Tensor]],
          input_rank: Optional[int]) -> Optional[nn.Module]:
    """The plain torch.nn module computing what the functional call computes (parameters not yet set)."""
    weight = tensors.get("weight")
    if kind == "convolution":
        kind = "conv_t" if bound.get("transposed") else "conv"
    if kind in ("conv", "conv_t"):
        if weight is None:
            return None
        dims = weight.ndim - 2
        groups = int(bound.get("groups", 1))
        stride, dilation = _tuple(bound.get("stride", 1), dims), _tuple(bound.get("dilation", 1), dims)
        padding = _tuple(bound.get("padding", 0), dims)
        if kind == "conv":
            return _CONVS[dims](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride, padding,
                                dilation, groups, bias=tensors.get("bias") is not None)
        return _CONV_TS[dims](weight.shape[0], weight.shape[1] * groups, tuple(weight.shape[2:]), stride, padding,
                              _tuple(bound.get("output_padding", 0), dims), groups, tensors.get("bias") is not None,
                              dilation)
    if kind == "linear":
        if weight is None or weight.ndim != 2:
            return None
        return nn.Linear(weight.shape[1], weight.shape[0], bias=tensors.get("bias") is not None)
    mean, var = tensors.get("running_mean"), tensors.get("running_var")
    if mean is None or var is None or input_rank not in _BNS:
        return None  # a BatchNorm without running statistics always normalizes by its batch
    return _BNS[input_rank](mean.numel(), eps=float(bound.get("eps", 1e-5)), momentum=bound.get("momentum", 0.1),
                            affine=weight is not None)


def _attach(twin: nn.Module, container: nn.Module, tensors: dict[str, Optional[torch.Tensor]],
            original: Optional[nn.Module]) -> None:
    """Give `twin` the layer's own parameter objects and everything else `container` held."""
    for role, tensor in tensors.items():
        if tensor is None:
            continue
        if role in ("weight", "bias"):
            setattr(twin, role, tensor)
        else:
            twin.register_buffer(role, tensor)
    counter = getattr(original, "num_batches_tracked", None)
    if isinstance(twin, nn.modules.batchnorm._BatchNorm) and isinstance(counter, torch.Tensor):
        twin.register_buffer("num_batches_tracked", counter)
    for name, child in container.named_children():
        twin.add_module(name, child)
    for name, value in list(container.named_parameters(recurse=False)) + list(container.named_buffers(recurse=False)):
        if name not in tensors and not hasattr(twin, name):
            setattr(twin, name, value) if isinstance(value, nn.Parameter) else twin.register_buffer(name, value)


def _module_or_none(root: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return root.get_submodule(path)
    except AttributeError:
        return None


def lift_layers(gm: fx.GraphModule, original: Optional[nn.Module] = None) -> int:
    """Replace functional convolutions, linear layers and BatchNorms on a module's own parameters
    by calls of plain torch.nn modules at that module's path (the module docstring). `original`:
    the captured model, where BatchNorm counters not read by the graph live. Needs shape
    propagation (a BatchNorm's dimensionality is its input's rank). Returns how many were lifted."""
    lifted: dict[str, nn.Module] = {}
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    count = 0
    for node in list(gm.graph.nodes):
        form = _form(node)
        if form is None:
            continue
        kind, names = form
        bound = _bind(node, names)
        if not isinstance(bound.get("input"), fx.Node) or any(isinstance(v, fx.Node) for k, v in bound.items()
                                                              if k not in ("input", *_ROLES[kind])):
            continue  # hyperparameters computed at run time
        path = _owner(bound, _ROLES[kind])
        if path is None or path in called:
            continue  # not a module's own parameters, or a module also called as a whole
        container = gm.get_submodule(path)
        tensors = {role: getattr(container, role) if bound.get(role) is not None else None for role in _ROLES[kind]}
        if any(t is not None and not isinstance(t, torch.Tensor) for t in tensors.values()):
            continue
        if kind in ("conv", "conv_t", "convolution", "linear") and not isinstance(tensors["weight"], nn.Parameter):
            continue  # a weight computed from parameters (weight standardization) stays a function
        meta = bound["input"].meta.get("tensor_meta")
        try:
            twin = lifted.get(path) or _twin(kind, bound, tensors, len(meta.shape) if hasattr(meta, "shape") else None)
        except (ValueError, TypeError, RuntimeError):  # e.g. padding="same" with a stride: no module form
            twin = None
        if twin is None:
            continue
        if path not in lifted:
            source = _module_or_none(original, path) if original is not None else None
            _attach(twin, container, tensors, source)
            twin.train(source.training if source is not None else gm.training)
            gm.add_submodule(path, twin)
            lifted[path] = twin
        outputs = [node]
        if kind == "native_bn":  # returns (output, mean, rstd); the eval form reads only the output
            outputs = list(node.users)
            if any(u.target is not operator.getitem or u.args[1] != 0 for u in outputs):
                continue
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(path, (bound["input"],))
        call.meta = dict(outputs[0].meta) if outputs else dict(node.meta)
        for out in outputs:
            out.replace_all_uses_with(call)
            if out is not node:
                gm.graph.erase_node(out)
        gm.graph.erase_node(node)
        count += 1
    if count:
        remove_dead_code(gm)
    return count


def _single_tensor_input(node: fx.Node) -> Optional[fx.Node]:
    first = node.args[0] if node.args else None
    return first if isinstance(first, fx.Node) else None


def _same_shape(node: fx.Node, source: fx.Node) -> bool:
    a, b = node.meta.get("tensor_meta"), source.meta.get("tensor_meta")
    return (a is not None and b is not None and hasattr(a, "shape") and hasattr(b, "shape")
            and tuple(a.shape) == tuple(b.shape) and a.dtype == b.dtype)


_IDENTITY_MODULES = (nn.Identity,)
_DROPOUT_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
# ops that return their input when the shape stays. Not among them: expand and repeat (a class
# token expanded to the batch keeps its shape at the example's batch of 1, not at others), and
# contiguous / clone (they change strides, and a later `view` may need them)
_SHAPE_METHODS = {"view", "reshape", "flatten", "squeeze", "unsqueeze", "view_as", "reshape_as", "unflatten",
                  "detach", "float", "type_as", "to"}
_SHAPE_FUNCTIONS = {torch.flatten, torch.reshape, torch.squeeze, torch.detach}
_SHAPE_ATEN = {"view", "_unsafe_view", "reshape", "flatten", "squeeze", "unsqueeze", "alias", "detach", "unflatten"}
_DROPOUT_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout}


_ADDS = {operator.add, torch.add, operator.sub, torch.sub}
_MULS = {operator.mul, torch.mul, operator.truediv, torch.div}


def _neutral_arithmetic(node: fx.Node) -> Optional[fx.Node]:
    """The tensor operand of ``x + 0``, ``0 + x``, ``x - 0``, ``x * 1``, ``x / 1`` (an identity
    branch that defaults to 0, a scale that defaults to 1), if `node` is one; the exporter folds
    such an op away, and with it the tensor a quant point would have been at."""
    if node.op not in ("call_function", "call_method") or len(node.args) != 2 or node.kwargs:
        return None
    name = node.target if node.op == "call_method" else (aten_name(node.target) or "")
    additive = node.target in _ADDS or name in ("add", "sub")
    multiplicative = node.target in _MULS or name in ("mul", "div")
    neutral = 0 if additive else 1 if multiplicative else None
    a, b = node.args
    first_ok = node.target not in (operator.sub, torch.sub, operator.truediv, torch.div) and name not in ("sub", "div")
    for tensor, constant in ((a, b), (b, a) if first_ok else (None, None)):
        if (neutral is not None and isinstance(tensor, fx.Node) and type(constant) in (int, float)
                and constant == neutral and _same_shape(node, tensor)):
            return tensor
    return None


def _cat_with_empties(node: fx.Node) -> Optional[fx.Node]:
    """The one non-empty input of a concatenation whose other inputs are empty (``x[:, :0]``
    beside ``x``, as a model with zero prefix tokens writes it)."""
    is_cat = (node.op == "call_function" and (node.target is torch.cat or aten_name(node.target) == "cat"))
    tensors = (node.args[0] if node.args else node.kwargs.get("tensors")) if is_cat else None
    if not isinstance(tensors, (list, tuple)) or not all(isinstance(t, fx.Node) for t in tensors):
        return None
    sizes = [getattr(t.meta.get("tensor_meta"), "shape", None) for t in tensors]
    if any(s is None for s in sizes):
        return None
    full = [t for t, s in zip(tensors, sizes) if all(d != 0 for d in s)]
    return full[0] if len(full) == 1 and len(tensors) > 1 and _same_shape(node, full[0]) else None


def _is_noop(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if _neutral_arithmetic(node) is not None or _cat_with_empties(node) is not None:
        return True
    source = _single_tensor_input(node)
    if source is None:
        return False
    if node.op == "call_module":
        m = modules[node.target]
        if isinstance(m, _IDENTITY_MODULES):
            return True
        if isinstance(m, _DROPOUT_MODULES):
            return m.p == 0
        return isinstance(m, nn.Flatten) and _same_shape(node, source)
    if node.op == "call_function" and node.target in _DROPOUT_FUNCTIONS:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        training = node.args[2] if len(node.args) > 2 else node.kwargs.get("training", True)
        return p == 0 or training is False
    if node.op == "call_function" and aten_name(node.target) == "dropout":
        return node.args[1] == 0 or node.args[2] is False
    same = _same_shape(node, source)
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS and same
    if node.op == "call_function":
        return (node.target in _SHAPE_FUNCTIONS or aten_name(node.target) in _SHAPE_ATEN) and same
    return False


def remove_noops(gm: fx.GraphModule) -> int:
    """Take out every op that returns its input unchanged (the module docstring); its readers read
    the input. Needs shape propagation (a reshape is a no-op only to the shape it already has)."""
    modules = dict(gm.named_modules())
    count = 0
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method") or not _is_noop(node, modules):
            continue
        node.replace_all_uses_with(_neutral_arithmetic(node) or _cat_with_empties(node) or _single_tensor_input(node))
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        gm.recompile()
    return count


_ASSERTIONS = {torch._assert, torch._assert_async, torch.fx._symbolic_trace._assert_is_none}


def remove_assertions(gm: fx.GraphModule) -> int:
    """Take out run-time assertions (the module docstring) and what only they read, then the
    inputs nothing reads any more that have a default (``attn_mask=None``: capture fixed them to
    it, and only fx's check of that value read them)."""
    doomed = [n for n in gm.graph.nodes if n.op == "call_function" and not n.users
              and (n.target in _ASSERTIONS or "assert" in (aten_name(n.target) or ""))]
    for node in doomed:
        gm.graph.erase_node(node)
    if doomed:
        remove_dead_code(gm)
    for node in list(gm.graph.nodes):
        if node.op == "placeholder" and not node.users and node.args:  # node.args: (default,)
            gm.graph.erase_node(node)
    gm.recompile()
    return len(doomed)


def remove_dead_code(gm: fx.GraphModule) -> None:
    """Drop pure nodes whose results nobody reads, and modules no node calls any more."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()


def normalized_graph(model: nn.Module, example_inputs: Sequence[torch.Tensor], leaf_modules: Iterable[Any] = (),
                     concrete_args: Optional[dict] = None) -> Captured:
    """`model` (used as is: pass a copy) captured and normalized, shapes recorded: what placement
    (and cross-layer equalization) reads. In-place ops are computed out of place first."""
    captured = capture(model, example_inputs, leaf_modules, concrete_args)
    gm = captured.gm
    remove_inplace(gm)
    propagate_shapes(gm, example_inputs)
    lift_layers(gm, model)
    remove_assertions(gm)
    remove_noops(gm)
    remove_dead_code(gm)
    return captured
