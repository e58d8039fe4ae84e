"""Where a command's model comes from: a deployq checkpoint, or a factory (+ a float state_dict).

    --ckpt qat.pt                                  deployq checkpoint: weights, config, qparams
    --ckpt float.pth --model pkg.mod:build          plain state_dict -> prepare (PTQ: calibrate next)
    --model pkg.mod:build --input-shape 1,3,64,64   the factory's own weights (inspect only)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

from torch import fx, nn

from deployq import checkpoint as ck
from deployq.checkpoint import CheckpointError, InputSpec
from deployq.config import QConfig, load_config
from deployq.prepare import prepare
from deployq.qat import is_calibrated


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
                  factory_kwargs: Optional[dict] = None) -> ModelSource:
    if ckpt is None and factory is None:
        raise ValueError("give --ckpt (a deployq checkpoint) or --model PKG.MOD:FACTORY")
    payload = ck.read_payload(ckpt) if ckpt is not None else None
    if payload is not None and ck.is_checkpoint(payload):
        c = ck.parse(payload, Path(ckpt))
        if config is not None or factory_kwargs is not None:
            raise ValueError(f"{ckpt} carries its own quantization config, learned qparams and factory "
                             "arguments; --config and --model-kwargs apply only to a plain state_dict with --model")
        model = ck.float_model(c, factory)
        inputs = input_specs(input_shape, c.inputs, model)
        c.inputs = inputs
        qmodel = ck.build(c, factory, model)
        calibrated = is_calibrated(qmodel)
        return ModelSource(qmodel, model, inputs, factory or c.factory, c.factory_kwargs, c.config, calibrated, c)
    if factory is None:
        raise CheckpointError(
            f"{ckpt} is not a deployq checkpoint; to quantize a plain state_dict name its model "
            "factory with --model PKG.MOD:FACTORY (and --calib DATA to calibrate)"
        )
    kwargs = dict(factory_kwargs or {})
    model = ck.call_factory(ck.import_factory(factory, allowed=True), factory, kwargs, "--model")
    if payload is not None:
        ck.load_weights(model, ck.plain_state_dict(payload, Path(ckpt)), str(ckpt), f"the model {factory} builds")
    inputs = input_specs(input_shape, None, model)
    qconfig = load_config(config)
    qmodel = prepare(model, tuple(i.example() for i in inputs), qconfig)
    return ModelSource(qmodel, model, inputs, factory, kwargs, qconfig, False)
