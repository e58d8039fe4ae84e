"""deployq checkpoints: weights + quant config + learned qparams + input spec + model factory.

A checkpoint is a dict of plain types and tensors saved with ``torch.save`` and read back with
``torch.load(..., weights_only=True)``: nothing in the file is unpickled as code. The model is
rebuilt by :mod:`deployq.qat.loading` (its factory, ``package.module:function`` with JSON-able
kwargs, then :func:`deployq.prepare`); a factory is imported only if it is one of deployq's
examples or the caller names it explicitly (``--model``).

    {"format": "deployq-checkpoint", "version": 1, "deployq_version": "0.1.0",
     "factory": "deployq.examples.lowlight.model:build", "factory_kwargs": {"width": 8},
     "inputs": [{"name": "x", "shape": [1, 4, 64, 64], "dtype": "float32"}],
     "config": {...QConfig.to_dict()...}, "state_dict": {...}, "qparams": {...qparams.json...},
     "fixed_weight_qparams": [weight quantizers whose qparams are stored, not recomputed (AdaRound)],
     "meta": {...training notes: epoch, metrics...}}
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn

from deployq.core import qparams as qp
from deployq._version import __version__
from deployq.qat.config import QConfig, from_dict
from deployq.core.files import atomic_path
from deployq.qat.calibrate import qparams_of
from deployq.qat.quantizers import FakeQuantizer

FORMAT, VERSION = "deployq-checkpoint", 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or used; the message names the file."""


@dataclass
class InputSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str = "float32"

    def example(self) -> torch.Tensor:
        return torch.zeros(self.shape, dtype=getattr(torch, self.dtype))

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass
class Checkpoint:
    factory: str
    factory_kwargs: dict[str, Any]
    inputs: list[InputSpec]
    config: QConfig
    state_dict: dict[str, torch.Tensor]
    qparams: dict[str, qp.QuantPoint] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    fixed_weight_qparams: list[str] = field(default_factory=list)
    path: Optional[Path] = None

    def example_inputs(self) -> tuple[torch.Tensor, ...]:
        return tuple(i.example() for i in self.inputs)


def save(path: str | Path, model: fx.GraphModule, *, factory: str, factory_kwargs: Optional[dict] = None,
         inputs: Sequence[InputSpec], meta: Optional[dict] = None) -> Path:
    """Write `model` (a prepared, calibrated GraphModule) to `path`, atomically. The input names
    are the model's own (its forward's argument names); `inputs` gives their shapes, in order."""
    model = getattr(model, "module", model)
    config: QConfig = model.get_submodule("act_quant").config
    names = [str(n.target) for n in model.graph.nodes if n.op == "placeholder"]
    if len(names) != len(inputs):
        raise CheckpointError(f"the model takes {len(names)} inputs ({names}), {len(inputs)} input specs were given")
    inputs = [InputSpec(name, tuple(i.shape), i.dtype) for name, i in zip(names, inputs)]
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "deployq_version": __version__,
        "factory": factory,
        "factory_kwargs": dict(factory_kwargs or {}),
        "inputs": [i.to_json() for i in inputs],
        "config": config.to_dict(),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "qparams": qp.dump(qparams_of(model).values()),
        "fixed_weight_qparams": [name for name, m in model.named_modules() if isinstance(m, FakeQuantizer)
                                 and m.is_weight and not m.weights_follow_observer and type(m).weights_follow_observer],
        "meta": dict(meta or {}),
    }
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def read_payload(path: str | Path) -> Any:
    """The object stored in a torch file, loaded with weights_only=True (tensors and plain data)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is a folder, not a file" if path.is_dir()
                              else f"checkpoint {path} does not exist")
    try:
        with warnings.catch_warnings():  # a file saved with another pickle protocol loads the same
            warnings.filterwarnings("ignore", message=".*pickle protocol.*", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except (KeyboardInterrupt, MemoryError):
        raise
    except Exception as err:  # torch.load fails in many ways on a file that is not a checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"cannot read checkpoint {path}: {first[:200]}. It is corrupt, truncated, not a torch file, or holds "
            "objects other than tensors and plain data (deployq never unpickles code)."
        ) from None


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], where: str, what: str) -> None:
    """Load `state` into `model` strictly; a mismatch is one error that says which keys are missing
    or unexpected and which tensors have other shapes (a model of another width, say)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k} {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model" for k in own
              if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        parts = [f"{len(shapes)} tensors have other shapes (e.g. {shapes[0]})"] if shapes else []
        parts += [f"{len(missing)} missing (e.g. {', '.join(missing[:3])})"] if missing else []
        parts += [f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})"] if unexpected else []
        raise CheckpointError(f"{where} does not fit {what}: {'; '.join(parts)}. Are the factory and its "
                              "keyword arguments (e.g. a width) the ones the weights were made with?")
    model.load_state_dict(state)


def is_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == FORMAT


def load(path: str | Path) -> Checkpoint:
    path = Path(path)
    return parse(read_payload(path), path)


def _config_as_written(config: object) -> object:
    """A checkpoint's config read as it was trained, or its learned qparams would not fit the quant
    points: one written before ``quantize_float_ops`` existed quantized every compute op's output,
    and one written before ``concat_keeps_bits`` gave a concatenation the default activation width."""
    if not isinstance(config, dict) or "extra_quantizer_dict" in config:
        return config
    legacy = {"quantize_float_ops": True, "concat_keeps_bits": False}
    return {**{key: value for key, value in legacy.items() if key not in config}, **config}


def parse(payload: Any, path: Path) -> Checkpoint:
    if not is_checkpoint(payload):
        raise CheckpointError(
            f"{path} is not a deployq checkpoint (a plain state_dict? then pass it with "
            "--model PKG.MODULE:FACTORY and --calib DATA for post-training quantization)"
        )
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {payload.get('version')} is not supported")
    try:
        return Checkpoint(
            factory=payload["factory"],
            factory_kwargs=_mapping(payload.get("factory_kwargs"), path, "factory_kwargs"),
            inputs=[InputSpec(i["name"], tuple(i["shape"]), i.get("dtype", "float32")) for i in payload["inputs"]],
            config=from_dict(_config_as_written(payload["config"]), f"{path}:config"),
            state_dict=payload["state_dict"],
            qparams=_qparams(payload.get("qparams"), path),
            meta=dict(payload.get("meta") or {}),
            path=path,
            fixed_weight_qparams=[str(n) for n in payload.get("fixed_weight_qparams") or []],
        )
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: missing or malformed field {err}") from None


def _qparams(value: Any, path: Path) -> dict[str, qp.QuantPoint]:
    if not value:
        return {}
    try:
        return qp.load(value)
    except (qp.QParamsError, TypeError, KeyError, ValueError) as err:
        raise CheckpointError(f"{path}: its qparams are malformed: {err}") from None


def _mapping(value: Any, path: Path, field: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: {field} must be a mapping, got {type(value).__name__}")
    return dict(value)


def plain_state_dict(payload: Any, path: Path) -> dict[str, torch.Tensor]:
    """A float state_dict from a torch file: the dict itself, or under 'state_dict' / 'model'."""
    if isinstance(payload, dict):
        for key in ("state_dict", "model"):
            if isinstance(payload.get(key), dict):
                payload = payload[key]
                break
        if payload and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()):
            return payload
    raise CheckpointError(f"{path} holds neither a deployq checkpoint nor a state_dict of tensors")
