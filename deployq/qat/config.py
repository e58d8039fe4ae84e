"""Quantization config: global defaults, per-layer overrides by name or glob, fusion choices.

Native form (YAML or a dict)::

    weight:     {bits: 8, scheme: per_channel_symmetric, quantizer: lsq, observer: auto}
    activation: {bits: 8, scheme: per_tensor_affine, quantizer: lsq, observer: percentile,
                 observer_args: {lower: 0.01, upper: 99.99}}
    input: 10                         # the model input(s): bits, a short string or a mapping
    fuse_activations: [relu, relu6]   # activations folded into the preceding Conv/Linear
    leaf_modules: [backbone.attn]     # modules kept whole (not traced into): quantized at their boundary
    quantize_float_ops: false         # true: also quantize tensors only float ops read (see placement)
    quantize_outputs: true            # false: a layer that makes a model output keeps it float
    concat_keeps_bits: true           # a concatenation no rule sets is as wide as the widest tensor it joins
    quantize_before_sloped: true      # false: a layer read only by PReLU / LeakyReLU keeps its output float
    layers:                           # applied in order; a later match overrides an earlier one
      "DBLE.*_conv1.*": {weight: 10 per_channel_affine, activation: 10 per_tensor_affine}
      "DBLE.DBLE_out":  {activation: {bits: 10}}
      "head.softmax":   {quantize: false}

``observer: auto`` (the default) is ``minmax`` above 4 bits and ``mse`` at 4 bits or fewer
(:mod:`deployq.core.qspec`); a named observer is used at any width.

The seeds' format is read as is: ``extra_quantizer_dict: {special_layer: {input_layer: 10,
NAME: {weight: "10 per_channel_affine", activation: "10 per_tensor_affine"}}}``; the other keys of
such a file (training options, distillation) are left to the parts that use them.

Names are quant-point names (docs/design.md, contract 1): module paths after de-duplication
(``DBF.DBF_conv9.lrelu_dup1``), or ``<module>.<op>`` for functions (``DBLE.CA.mul``). A weight
override given by layer name applies to that layer's weight; an activation override given by any
module of a fused group (Conv, BN or activation) applies to the group's output.
"""

from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

from deployq.qat.observers import OBSERVERS
from deployq.core.files import read_yaml
from deployq.core.qspec import DEFAULT_ACTIVATION, DEFAULT_WEIGHT, QuantSpec, parse_changes
from deployq.qat.quantizers import QUANTIZERS

FUSABLE_ACTIVATIONS = ("relu", "relu6", "leaky_relu", "hardtanh")
# What onnxruntime's CPU integer kernels absorb: ReLU / ReLU6 / Clip disappear into the requantize
# step of QLinearConv; a LeakyReLU between Conv and Q keeps the convolution in float (measured,
# onnxruntime 1.31), so by default LeakyReLU gets its own quant point.
DEFAULT_FUSED = ("relu", "relu6", "hardtanh")


class ConfigError(ValueError):
    """A config that cannot be applied; the message names the key or layer."""


@dataclass(frozen=True)
class LayerOverride:
    pattern: str
    weight: Mapping[str, Any] = field(default_factory=dict)
    activation: Mapping[str, Any] = field(default_factory=dict)
    quantize: bool = True

    def matches(self, names: Iterable[str]) -> bool:
        return any(fnmatch.fnmatchcase(n, self.pattern) for n in names)


@dataclass(frozen=True)
class QConfig:
    weight: QuantSpec = DEFAULT_WEIGHT
    activation: QuantSpec = DEFAULT_ACTIVATION
    input: Mapping[str, Any] = field(default_factory=dict)
    layers: tuple[LayerOverride, ...] = ()
    fuse_activations: tuple[str, ...] = DEFAULT_FUSED
    leaf_modules: tuple[str, ...] = ()  # module paths (or class names) captured whole
    # True: also quantize the output of an op with no integer kernel that only such ops read (a
    # QNN/HTP graph that must be integer throughout); False leaves it float (deployq.qat.placement)
    quantize_float_ops: bool = False
    # False: a layer whose output only the model's outputs read keeps that output float (its
    # weights stay quantized; onnxruntime then runs it in float), as NNCF does by default
    quantize_outputs: bool = True
    # True: a concatenation whose bits no layer rule sets takes the widest width among the quant
    # points it joins (a 10-bit skip joined to an 8-bit path stays 10-bit; deployq.qat.placement)
    concat_keeps_bits: bool = True
    # False: a Conv / Linear whose output only PReLU or LeakyReLU read keeps that output float, as
    # NNCF's ONNX export leaves it: one rounding less per layer, and onnxruntime runs the layer in
    # float (its input and weights stay quantized). MTCNN's networks in torch: +3.1 to +4.4 dB
    quantize_before_sloped: bool = True

    def __post_init__(self) -> None:
        for key in ("quantize_float_ops", "quantize_outputs", "concat_keeps_bits", "quantize_before_sloped"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{key} must be true or false")
        if isinstance(self.leaf_modules, str) or not all(isinstance(m, str) and m for m in self.leaf_modules):
            raise ConfigError("leaf_modules must be a list of module paths or class names, e.g. [backbone.attn]")
        unknown = set(self.fuse_activations) - set(FUSABLE_ACTIVATIONS)
        if unknown:
            raise ConfigError(
                f"fuse_activations: unknown {sorted(unknown)}; known: {', '.join(FUSABLE_ACTIVATIONS)}"
            )
        # validate every override now, not when a layer first meets it
        _apply(self.activation, self.input, "input")
        for rule in self.layers:
            _apply(self.weight, rule.weight, f"layers[{rule.pattern!r}].weight")
            _apply(self.activation, rule.activation, f"layers[{rule.pattern!r}].activation")

    # --- resolution ------------------------------------------------------------------------
    def spec_for(self, kind: str, names: Iterable[str]) -> QuantSpec | None:
        """The spec of a quant point of `kind` ('input' | 'activation' | 'weight') known by
        `names` (its own name and the module names a config may use for it); None = not quantized."""
        names = list(names)
        base = self.weight if kind == "weight" else self.activation
        spec = base.updated(self.input) if kind == "input" else base
        for rule in self.layers:
            if not rule.matches(names):
                continue
            if not rule.quantize:
                return None
            changes = rule.weight if kind == "weight" else rule.activation
            spec = _apply(spec, changes, f"layers[{rule.pattern!r}].{'weight' if kind == 'weight' else 'activation'}")
        return spec

    def overrides(self, key: str, names: Iterable[str]) -> bool:
        """True if a layer rule matching `names` sets the activation setting `key` (e.g. observer)."""
        names = list(names)
        return any(rule.matches(names) and key in rule.activation for rule in self.layers)

    def sets_activation(self, names: Iterable[str]) -> bool:
        """True if a layer rule matching `names` gives activation settings (the user asked for this point)."""
        names = list(names)
        return any(rule.matches(names) and rule.quantize and rule.activation for rule in self.layers)

    def check_names(self, known: Iterable[str]) -> None:
        """Every override must match at least one quant point; else list the nearest names."""
        known = sorted(set(known))
        for rule in self.layers:
            if not any(fnmatch.fnmatchcase(n, rule.pattern) for n in known):
                close = difflib.get_close_matches(rule.pattern, known, n=5, cutoff=0.4)
                hint = f" Nearest names: {', '.join(close)}." if close else ""
                raise ConfigError(
                    f"config layer {rule.pattern!r} matches no quant point or layer of the model.{hint} "
                    "List them all with `deployq inspect`."
                )

    # --- I/O -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "weight": _spec_dict(self.weight),
            "activation": _spec_dict(self.activation),
            "input": dict(self.input),
            "fuse_activations": list(self.fuse_activations),
            **({"leaf_modules": list(self.leaf_modules)} if self.leaf_modules else {}),
            "quantize_float_ops": self.quantize_float_ops,
            "quantize_outputs": self.quantize_outputs,
            "concat_keeps_bits": self.concat_keeps_bits,
            "quantize_before_sloped": self.quantize_before_sloped,
            "layers": {
                r.pattern: ({"quantize": False} if not r.quantize else
                            {k: dict(v) for k, v in (("weight", r.weight), ("activation", r.activation)) if v})
                for r in self.layers
            },
        }


def _spec_dict(spec: QuantSpec) -> dict[str, Any]:
    d = spec.to_dict()
    d["scheme"] = spec.scheme
    del d["per_channel"], d["symmetric"]
    return d


def _apply(spec: QuantSpec, changes: Mapping[str, Any], where: str) -> QuantSpec:
    try:
        spec = spec.updated(dict(changes)) if changes else spec
        QUANTIZERS.get(spec.quantizer)
        OBSERVERS.get(spec.observer_name)
    except (ValueError, TypeError, KeyError) as err:
        message = err.args[0] if isinstance(err, KeyError) else err
        raise ConfigError(f"{where}: {message}") from None
    return spec


def _changes(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    try:
        return parse_changes(value)
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None


def _spec(value: Any, default: QuantSpec, where: str) -> QuantSpec:
    return _apply(default, _changes(value, where), where)


NATIVE_KEYS = {"weight", "activation", "input", "layers", "fuse_activations", "leaf_modules", "quantize_float_ops",
               "quantize_outputs", "concat_keeps_bits", "quantize_before_sloped"}


def from_dict(data: Mapping[str, Any] | None, source: str = "config") -> QConfig:
    """Build a QConfig from the native form or the seeds' form (``extra_quantizer_dict``)."""
    if data is None:
        return QConfig()
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    if "extra_quantizer_dict" in data:
        return _from_seeds(data, source)
    unknown = set(data) - NATIVE_KEYS
    if unknown:
        raise ConfigError(f"{source}: unknown keys {sorted(unknown)}; known: {', '.join(sorted(NATIVE_KEYS))}")
    layers = []
    raw_layers = data.get("layers") or {}
    if not isinstance(raw_layers, Mapping):
        raise ConfigError(f"{source}: 'layers' must map layer names (or globs) to settings")
    for pattern, value in raw_layers.items():
        layers.append(_layer(str(pattern), value, f"{source}: layers[{pattern!r}]"))
    fused = data.get("fuse_activations", DEFAULT_FUSED)
    if isinstance(fused, str) or not isinstance(fused, Iterable):
        raise ConfigError(f"{source}: fuse_activations must be a list, e.g. [relu, relu6]")
    leaves = data.get("leaf_modules") or ()
    if isinstance(leaves, str) or not isinstance(leaves, Iterable):
        raise ConfigError(f"{source}: leaf_modules must be a list of module paths, e.g. [backbone.attn]")
    return QConfig(
        weight=_spec(data.get("weight"), DEFAULT_WEIGHT, f"{source}: weight"),
        activation=_spec(data.get("activation"), DEFAULT_ACTIVATION, f"{source}: activation"),
        input=_changes(data.get("input"), f"{source}: input"),
        layers=tuple(layers),
        fuse_activations=tuple(fused),
        leaf_modules=tuple(str(m) for m in leaves),
        quantize_float_ops=data.get("quantize_float_ops", False),
        quantize_outputs=data.get("quantize_outputs", True),
        concat_keeps_bits=data.get("concat_keeps_bits", True),
        quantize_before_sloped=data.get("quantize_before_sloped", True),
    )


def _layer(pattern: str, value: Any, where: str) -> LayerOverride:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping with weight / activation / quantize")
    unknown = set(value) - {"weight", "activation", "quantize"}
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown)}; known: weight, activation, quantize")
    quantize = value.get("quantize", True)
    if not isinstance(quantize, bool):
        raise ConfigError(f"{where}.quantize must be true or false")
    return LayerOverride(
        pattern=pattern,
        weight=_changes(value.get("weight"), f"{where}.weight"),
        activation=_changes(value.get("activation"), f"{where}.activation"),
        quantize=quantize,
    )


SEEDS_KEYS = {"extra_quantizer_dict", "fuse_activations"}
# The rest of a seeds' experiment file (its training settings, which `deployq train --recipe` reads):
# such a file may serve as the config, and the config leaves these keys to the recipe.
SEEDS_EXPERIMENT_KEYS = {"quant", "test", "onnx", "quant_teacher", "gpu_id", "batch_size", "debug", "pdb_debug",
                         "load_model", "load_quant_model", "load_teacher_model", "config_file_path",
                         "output_layer_list", "distill_config", "distill_coeff"}


def _from_seeds(data: Mapping[str, Any], source: str) -> QConfig:
    unknown = sorted(set(data) - SEEDS_KEYS - SEEDS_EXPERIMENT_KEYS)
    if unknown:
        raise ConfigError(f"{source}: unknown keys {', '.join(map(repr, unknown))} next to extra_quantizer_dict; "
                          f"known: {', '.join(sorted(SEEDS_KEYS))} (and the seeds' training settings, "
                          f"{', '.join(sorted(SEEDS_EXPERIMENT_KEYS))})")
    extra = data.get("extra_quantizer_dict") or {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"{source}: extra_quantizer_dict must be a mapping with special_layer")
    for key, value in extra.items():
        if key == "special_layer":
            continue
        if key == "input_layer" or (isinstance(value, Mapping) and set(value) <= {"weight", "activation", "quantize"}):
            raise ConfigError(f"{source}: extra_quantizer_dict.{key} is one level too high: it belongs under "
                              f"extra_quantizer_dict.special_layer ({{special_layer: {{{key}: ...}}}})")
        raise ConfigError(f"{source}: extra_quantizer_dict.{key} is unknown; known: special_layer")
    special = extra.get("special_layer") or {}
    if not isinstance(special, Mapping):
        raise ConfigError(f"{source}: extra_quantizer_dict.special_layer must be a mapping")
    input_changes: dict[str, Any] = {}
    layers = []
    for name, value in special.items():
        where = f"{source}: extra_quantizer_dict.special_layer.{name}"
        if name == "input_layer":
            input_changes = _changes(value, where)
        else:
            layers.append(_layer(str(name), value, where))
    return QConfig(input=input_changes, layers=tuple(layers),
                   fuse_activations=tuple(data.get("fuse_activations", DEFAULT_FUSED)))


def load_config(config: str | Path | Mapping[str, Any] | QConfig | None) -> QConfig:
    """A QConfig from a YAML path, a dict, an existing QConfig, or None (defaults)."""
    if config is None or isinstance(config, QConfig):
        return config or QConfig()
    if isinstance(config, Mapping):
        return from_dict(config)
    return from_dict(read_yaml(config, "config file", ConfigError), str(config))
