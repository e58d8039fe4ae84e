"""deployq checkpoints: weights + quant config + learned qparams + input spec + model factory.

A checkpoint is a dict of plain types and tensors saved with ``torch.save`` and read back with
``torch.load(..., weights_only=True)``: nothing in the file is unpickled as code. The model is
rebuilt by calling its factory (``package.module:function`` with JSON-able kwargs) and
:func:`deployq.prepare`; a factory is imported only if it lives inside deployq or the caller
names it explicitly (``--model``).

    {"format": "deployq-checkpoint", "version": 1, "deployq_version": "0.1.0",
     "factory": "deployq.examples.lowlight.model:build", "factory_kwargs": {"width": 8},
     "inputs": [{"name": "x", "shape": [1, 4, 64, 64], "dtype": "float32"}],
     "config": {...QConfig.to_dict()...}, "state_dict": {...}, "qparams": {...qparams.json...},
     "meta": {...training notes: epoch, metrics...}}
"""

from __future__ import annotations

import importlib
import inspect
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import fx, nn

from deployq import qparams as qp
from deployq._version import __version__
from deployq.config import QConfig, from_dict
from deployq.files import atomic_path
from deployq.prepare import prepare
from deployq.qat import is_calibrated, qparams_of, set_mode

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
    qparams: dict[str, qp.QParams] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
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
            config=from_dict(payload["config"], f"{path}:config"),
            state_dict=payload["state_dict"],
            qparams=_qparams(payload.get("qparams"), path),
            meta=dict(payload.get("meta") or {}),
            path=path,
        )
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"{path}: missing or malformed field {err}") from None


def _qparams(value: Any, path: Path) -> dict[str, qp.QParams]:
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


# The model factories a checkpoint may name on its own: the examples shipped inside deployq. Any
# other factory is imported only when the user names it (--model, or a recipe they wrote); a
# checkpoint naming, say, deployq.cli:main is refused (it would run the CLI with the file's arguments).
REGISTERED_FACTORIES = frozenset({
    "deployq.examples.lowlight.model:build",
    *(f"deployq.examples.zoo:{name}" for name in
      ("plain_cnn", "unet", "resnet", "channel_attention", "reused", "space_to_depth", "upsampler")),
    "deployq.examples.torchvision_models:build",
    "deployq.examples.torchvision_models:two_inputs",
})
PLAIN_TYPES = (type(None), bool, int, float, str)


def import_factory(reference: str, allowed: bool) -> Callable[..., nn.Module]:
    """Import ``package.module:function``: a registered example factory, or any factory the user
    named (`allowed`)."""
    module_name, _, attr = reference.partition(":")
    if not module_name or not attr:
        raise CheckpointError(f"model factory {reference!r} must look like package.module:function")
    if not allowed and reference not in REGISTERED_FACTORIES:
        raise CheckpointError(
            f"the checkpoint names the model factory {reference!r}, which is not one of deployq's examples; "
            f"deployq does not import code named inside a file. If you trust it, pass --model {reference}."
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise CheckpointError(f"cannot import model factory module {module_name!r}: {err}") from None
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


def float_model(ckpt: Checkpoint, factory: Optional[str] = None) -> nn.Module:
    """The float model, built by the checkpoint's factory (or `factory`, which the user named)."""
    reference = factory or ckpt.factory
    where = str(ckpt.path or "the checkpoint")
    try:
        build = import_factory(reference, allowed=factory is not None)
    except CheckpointError as err:
        raise CheckpointError(f"{where}: {err}") from None
    return call_factory(build, reference, ckpt.factory_kwargs, where)


def build(ckpt: Checkpoint, factory: Optional[str] = None, model: Optional[nn.Module] = None) -> fx.GraphModule:
    """The QAT model of a checkpoint, weights and qparams loaded, in quantize mode (eval).
    `model`: the float model to prepare, if already built (else the factory builds it)."""
    model = prepare(model if model is not None else float_model(ckpt, factory), ckpt.example_inputs(), ckpt.config)
    load_weights(model, ckpt.state_dict, str(ckpt.path or "the checkpoint"), f"the model {factory or ckpt.factory} builds")
    calibrated = is_calibrated(model)
    set_mode(model, "quantize" if calibrated else "float")
    return model.eval()
