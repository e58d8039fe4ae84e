"""Model loading, the one path every command, the API and training take.

A float model is built by its factory (``package.module:function``, plain-data keyword arguments
checked against its signature) and, when given, a float state_dict is loaded strictly
(``weights_only=True``). A factory is imported only if it is one of deployq's examples or the user
named it (``--model``, a recipe they wrote); a checkpoint cannot make deployq import anything else.

    --ckpt qat.pt                                  deployq checkpoint: weights, config, qparams
    --ckpt float.pth --model pkg.mod:build          plain state_dict -> prepare (PTQ: calibrate next)
    --model pkg.mod:build --input-shape 1,3,64,64   the factory's own weights (inspect only)
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from torch import fx, nn

from deployq.qat import checkpoint as ck
from deployq.qat import onnx_import
from deployq.qat.checkpoint import CheckpointError, InputSpec
from deployq.qat.config import QConfig, load_config
from deployq.qat.prepare import prepare
from deployq.qat.calibrate import is_calibrated, set_mode
from deployq.qat.quantizers import FakeQuantizer


# The model factories a checkpoint may name on its own: the examples shipped inside deployq. Any
# other factory is imported only when the user names it (--model, or a recipe they wrote); a
# checkpoint naming, say, deployq.cli:main is refused (it would run the CLI with the file's arguments).
REGISTERED_FACTORIES = frozenset({
    "deployq.examples.lowlight.model:build",
    *(f"deployq.examples.zoo:{name}" for name in
      ("plain_cnn", "unet", "resnet", "channel_attention", "reused", "space_to_depth", "upsampler",
       "freely_written")),
    "deployq.examples.torchvision_models:build",
    "deployq.examples.torchvision_models:two_inputs",
    onnx_import.FACTORY,  # reads an ONNX file (weights and graph), runs no code from it
})
PLAIN_TYPES = (type(None), bool, int, float, str)


def import_factory(reference: str, allowed: bool, what: str = "model factory") -> Callable[..., Any]:
    """Import ``package.module:function``: a registered example model factory, or any callable the
    user named (`allowed`: a model factory, a recipe's dataset or loss)."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise CheckpointError(f"{what} {reference!r} must look like package.module:function")
    if not allowed and reference not in REGISTERED_FACTORIES:
        raise CheckpointError(
            f"the checkpoint names the model factory {reference!r}, which is not one of deployq's examples; "
            f"deployq does not import code named inside a file. If you trust it, pass --model {reference}."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CheckpointError(f"cannot import {what} module {module_name!r}: {err}") from None
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise CheckpointError(f"{module_name!r} has no callable {attr!r}")
    return factory


def _is_plain(value: Any) -> bool:
    if isinstance(value, PLAIN_TYPES):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def call_factory(build: Callable[..., nn.Module], reference: str, kwargs: dict[str, Any],
                 where: str = "the checkpoint") -> nn.Module:
    """``build(**kwargs)``, once the keyword arguments are known to be plain data (numbers,
    strings, lists, dicts) that the factory's signature accepts."""
    if not isinstance(kwargs, dict) or not _is_plain(kwargs):
        raise CheckpointError(f"{where}: the keyword arguments of {reference} must be plain data (numbers, "
                              f"strings, lists, dicts), got {kwargs!r:.200}")
    try:
        inspect.signature(build).bind(**kwargs)
    except TypeError as err:
        raise CheckpointError(f"{where}: model factory {reference} does not take the keyword arguments "
                              f"{sorted(kwargs)}: {err}") from None
    except ValueError:  # no signature to check (a builtin): let the call decide
        pass
    try:
        model = build(**kwargs)
    except TypeError as err:  # e.g. a factory taking **kwargs that its model's constructor rejects
        raise CheckpointError(f"{where}: model factory {reference} rejected the keyword arguments "
                              f"{kwargs!r:.200}: {err}") from None
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"model factory {reference} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def float_model(factory: str, kwargs: dict[str, Any], where: str, *, allowed: bool,
                weights: Optional[str | Path] = None, payload: Any = None) -> nn.Module:
    """``factory(**kwargs)``, then the float state_dict `weights` (or an already read `payload`)
    loaded strictly. `allowed`: the user named the factory (else only deployq's examples)."""
    try:
        build = import_factory(factory, allowed)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None
    model = call_factory(build, factory, kwargs, where)
    if weights is not None:
        load_float_weights(model, weights, factory, payload)
    return model


def load_float_weights(model: nn.Module, path: str | Path, factory: str, payload: Any = None) -> None:
    """Load a plain float state_dict (``torch.load(weights_only=True)``) into `model`, strictly;
    a deployq checkpoint is refused (its weights belong to a prepared model)."""
    payload = ck.read_payload(path) if payload is None else payload
    if ck.is_checkpoint(payload):
        raise CheckpointError(f"{path} is a deployq checkpoint (already quantized), not the float model's "
                              "state_dict; QAT and PTQ start from float weights (to continue a QAT run use --resume)")
    ck.load_weights(model, ck.plain_state_dict(payload, Path(path)), str(path), f"the model {factory} builds")


def checkpoint_float_model(ckpt: ck.Checkpoint, factory: Optional[str] = None) -> nn.Module:
    """The float model of a checkpoint, built by its factory (or `factory`, which the user named)."""
    return float_model(factory or ckpt.factory, ckpt.factory_kwargs, str(ckpt.path or "the checkpoint"),
                       allowed=factory is not None)


def build(ckpt: ck.Checkpoint, factory: Optional[str] = None, model: Optional[nn.Module] = None) -> fx.GraphModule:
    """The QAT model of a checkpoint, weights and qparams loaded, in quantize mode (eval).
    `model`: the float model to prepare, if already built (else the factory builds it)."""
    model = prepare(model if model is not None else checkpoint_float_model(ckpt, factory), ckpt.example_inputs(),
                    ckpt.config)
    ck.load_weights(model, ckpt.state_dict, str(ckpt.path or "the checkpoint"),
                    f"the model {factory or ckpt.factory} builds")
    for name in ckpt.fixed_weight_qparams:
        quantizer = model.get_submodule(name) if name in dict(model.named_modules()) else None
        if not isinstance(quantizer, FakeQuantizer):
            raise ck.CheckpointError(f"{ckpt.path or 'the checkpoint'}: fixed_weight_qparams names {name!r}, which is "
                                     "not a quantizer of the model")
        quantizer.keep_qparams()
    set_mode(model, "quantize" if is_calibrated(model) else "float")
    return model.eval()


@dataclass
class ModelSource:
    qmodel: fx.GraphModule
    float_model: nn.Module  # the model qmodel was prepared from (float weights of the source)
    inputs: list[InputSpec]
    factory: str
    factory_kwargs: dict
    config: QConfig
    calibrated: bool
    checkpoint: Optional[ck.Checkpoint] = None

    def example_inputs(self) -> tuple:
        return tuple(i.example() for i in self.inputs)

    def with_config(self, config: QConfig) -> fx.GraphModule:
        """The model prepared again under `config`, with this source's weights (and the old
        qparams, to be replaced by the caller)."""
        if config == self.config:
            return self.qmodel
        model = prepare(self.float_model, self.example_inputs(), config)
        model.load_state_dict(self.qmodel.state_dict(), strict=False)
        return model


InputShapes = Union[tuple[int, ...], Sequence[tuple[Optional[str], tuple[int, ...]]], None]


def forward_arguments(model: nn.Module) -> list[str]:
    """The names of the inputs a model's forward() needs (arguments without a default)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return ["x"]
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in params if p.kind in kinds and p.default is inspect.Parameter.empty] or ["x"]


def input_specs(shapes: InputShapes, known: Optional[list[InputSpec]], model: nn.Module) -> list[InputSpec]:
    """The model's inputs: `known` (a checkpoint's), with shapes replaced by `shapes` if given:
    one unnamed shape for a one-input model, or ``[(name, shape), ...]`` naming each input."""
    names = [i.name for i in known] if known else forward_arguments(model)
    if not shapes:
        if not known:
            per_input = "" if len(names) == 1 else f" for each of its inputs ({', '.join(names)}) as NAME:N,C,H,W"
            raise ValueError(f"the model's input shape is unknown; pass --input-shape N,C,H,W{per_input}")
        return known
    if isinstance(shapes, tuple) and all(isinstance(d, int) for d in shapes):
        shapes = [(None, shapes)]
    if len(shapes) == 1 and shapes[0][0] is None:
        if len(names) != 1:
            raise ValueError(f"the model takes {len(names)} inputs ({', '.join(names)}); give one "
                             "--input-shape NAME:N,C,H,W for each")
        return [InputSpec(names[0], tuple(shapes[0][1]))]
    given = {name: tuple(shape) for name, shape in shapes}
    unknown, missing = [n for n in given if n not in names], [n for n in names if n not in given]
    if unknown or missing:
        raise ValueError(f"--input-shape names {', '.join(unknown) or 'no unknown input'}"
                         f"{'' if not missing else '; missing ' + ', '.join(missing)}: the model's inputs are "
                         f"{', '.join(names)}")
    return [InputSpec(n, given[n]) for n in names]


def resolve_model(*, ckpt: Optional[str] = None, factory: Optional[str] = None,
                  config: Optional[str] = None, input_shape: InputShapes = None,
                  factory_kwargs: Optional[dict] = None, leaf_modules: Sequence[str] = (),
                  onnx_file: Optional[str | Path] = None) -> ModelSource:
    """The model a command works on: a deployq checkpoint, a factory (+ float state_dict) or a
    float ONNX file (`onnx_file`), prepared under `config` with `leaf_modules` (``--leaf``) added."""
    if onnx_file is not None:
        if ckpt is not None or factory is not None or factory_kwargs:
            raise ValueError("--onnx is the model: give it without --ckpt, --model or --model-kwargs")
        if leaf_modules:
            raise ValueError("--leaf keeps a PyTorch module whole while tracing; an ONNX model is not traced, "
                             "so it takes no --leaf (a layer rule in --config changes how a tensor is quantized)")
        path = Path(onnx_file)
        if not path.is_file():
            raise onnx_import.OnnxImportError(f"{onnx_file}: no such ONNX file")
        shapes = onnx_import.resolve_shapes(path, input_shape)
        factory, factory_kwargs = onnx_import.FACTORY, {"path": str(path.resolve()),
                                                        "sha256": onnx_import.file_digest(path),
                                                        "shapes": [list(shape) for _, shape in shapes]}
        input_shape = [(onnx_import.identifier(name), shape) for name, shape in shapes]
    if ckpt is None and factory is None:
        raise ValueError("give --ckpt (a deployq checkpoint) or --model PKG.MOD:FACTORY")
    payload = ck.read_payload(ckpt) if ckpt is not None else None
    if payload is not None and ck.is_checkpoint(payload):
        c = ck.parse(payload, Path(ckpt))
        if config is not None or factory_kwargs is not None or leaf_modules:
            raise ValueError(f"{ckpt} carries its own quantization config (leaf modules included), learned qparams "
                             "and factory arguments; --config, --leaf and --model-kwargs apply only to a plain "
                             "state_dict with --model")
        model = checkpoint_float_model(c, factory)
        inputs = input_specs(input_shape, c.inputs, model)
        c.inputs = inputs
        qmodel = build(c, factory, model)
        calibrated = is_calibrated(qmodel)
        return ModelSource(qmodel, model, inputs, factory or c.factory, c.factory_kwargs, c.config, calibrated, c)
    if factory is None:
        raise CheckpointError(
            f"{ckpt} is not a deployq checkpoint; to quantize a plain state_dict name its model "
            "factory with --model PKG.MOD:FACTORY (and --calib DATA to calibrate)"
        )
    kwargs = dict(factory_kwargs or {})
    model = float_model(factory, kwargs, "--model", allowed=True, weights=ckpt, payload=payload)  # the user named it
    inputs = input_specs(input_shape, None, model)
    qconfig = load_config(config)
    if leaf_modules:
        qconfig = replace(qconfig, leaf_modules=tuple(dict.fromkeys((*qconfig.leaf_modules, *leaf_modules))))
    qmodel = prepare(model, tuple(i.example() for i in inputs), qconfig)
    return ModelSource(qmodel, model, inputs, factory, kwargs, qconfig, False)
