"""Where a command's model comes from: a deployq checkpoint, or a factory (+ a float state_dict).

    --ckpt qat.pt                                  deployq checkpoint: weights, config, qparams
    --ckpt float.pth --model pkg.mod:build          plain state_dict -> prepare (PTQ: calibrate next)
    --model pkg.mod:build --input-shape 1,3,64,64   the factory's own weights (inspect only)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from torch import fx, nn

from deployq import checkpoint as ck
from deployq.checkpoint import CheckpointError, InputSpec
from deployq.config import QConfig, load_config
from deployq.prepare import prepare, quant_points


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


def _inputs(shape: Optional[tuple[int, ...]], default: Optional[list[InputSpec]]) -> list[InputSpec]:
    if shape is not None:
        name = default[0].name if default else "x"
        if default and len(default) > 1:
            raise ValueError("--input-shape sets one input, but the model has several")
        return [InputSpec(name, shape)]
    if not default:
        raise ValueError("the model's input shape is unknown; pass --input-shape N,C,H,W")
    return default


def resolve_model(*, ckpt: Optional[str] = None, factory: Optional[str] = None,
                  config: Optional[str] = None, input_shape: Optional[tuple[int, ...]] = None,
                  factory_kwargs: Optional[dict] = None) -> ModelSource:
    if ckpt is None and factory is None:
        raise ValueError("give --ckpt (a deployq checkpoint) or --model PKG.MOD:FACTORY")
    payload = ck.read_payload(ckpt) if ckpt is not None else None
    if payload is not None and ck.is_checkpoint(payload):
        c = ck.parse(payload, Path(ckpt))
        if config is not None or factory_kwargs is not None:
            raise ValueError(f"{ckpt} carries its own quantization config, learned qparams and factory "
                             "arguments; --config and --model-kwargs apply only to a plain state_dict with --model")
        inputs = _inputs(input_shape, c.inputs)
        c.inputs = inputs
        model = ck.float_model(c, factory)
        qmodel = ck.build(c, factory, model)
        calibrated = all(bool(qmodel.get_submodule(p.quantizer).initialized)
                         for p in quant_points(qmodel).values() if p.kind != "weight")
        return ModelSource(qmodel, model, inputs, factory or c.factory, c.factory_kwargs, c.config, calibrated, c)
    if factory is None:
        raise CheckpointError(
            f"{ckpt} is not a deployq checkpoint; to quantize a plain state_dict name its model "
            "factory with --model PKG.MOD:FACTORY (and --calib DATA to calibrate)"
        )
    kwargs = dict(factory_kwargs or {})
    dummy = ck.Checkpoint(factory, kwargs, [], QConfig(), {})
    model = ck.float_model(dummy, factory)
    if payload is not None:
        state = ck.plain_state_dict(payload, Path(ckpt))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{ckpt} does not fit {factory}: missing {sorted(missing)[:5]}, "
                                  f"unexpected {sorted(unexpected)[:5]}")
    inputs = _inputs(input_shape, None)
    qconfig = load_config(config)
    qmodel = prepare(model, tuple(i.example() for i in inputs), qconfig)
    return ModelSource(qmodel, model, inputs, factory, kwargs, qconfig, False)
