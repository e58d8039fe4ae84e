"""Feature distillation from a teacher, the second term of the training objective
(:mod:`deployq.train.losses` has the first):

    L = L_task(student(x), y) + Σ_i λ_i · MSE(t_i, s_i)

where s_i / t_i are the student's / teacher's activations at distillation layer i and λ_i its
weight (feature distillation, FitNets: Romero et al., ICLR 2015; the thesis picks the layers and
weights by the Hessian trace, :mod:`deployq.train.hessian`). The student is the QAT model; the teacher
is the float model, prepared the same way and left in ``float`` mode (so the names match), or
fake-quantized with the student's calibrated qparams when ``quant_teacher`` is set.

Intermediate activations are taken by rewriting the fx graph's output (:func:`expose`), never
with forward hooks. Layer names are quant-point names (docs/design.md, contract 1): the output of
``act_quant.NAME``.

Distillation settings, native form::

    distill:
      layers: {DBLE.dual_conv9.lrelu_dup1: 0.7, DBF.DBF_conv9.lrelu_dup1: 0.7}
      quant_teacher: false
      teacher_weights: float.pth        # optional; default: the student's float weights

and the seeds' keys, read as they are (top level of the file)::

    output_layer_list : ['DBLE.dual_conv9.lrelu_dup1', 'DBF.DBF_conv9.lrelu_dup1']
    distill_config : ['DBLE.dual_conv9.lrelu_dup1', 'DBF.DBF_conv9.lrelu_dup1']
    distill_coeff : [0.7, 0.7]
    quant_teacher : True
    load_teacher_model : ./onnx/SID_weights_690000.pth
"""

from __future__ import annotations

import difflib
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from deployq.core.files import read_yaml
from deployq.train.losses import DistillError
from deployq.qat.prepare import ACT_QUANT, QuantPoints



class LayerNotFoundError(DistillError):
    """A layer name that is not in the model; the message lists the nearest real names."""


# ------------------------------------------------------------------------------------ layers


class LayerIndex:
    """Every name a layer can be given, mapped to the fx node whose output is that activation.

    In order of precedence: quant-point names (the output of ``act_quant.NAME``); the other
    module names of a fused group (``enc1.0`` for the group ``enc1.2``); module paths of
    ``call_module`` nodes called once; fx node names. The last two make a plain
    ``torch.fx.symbolic_trace`` model work as well.
    """

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        points = getattr(gm, ACT_QUANT, None)
        self.table = points.table if isinstance(points, QuantPoints) else {}
        self.nodes: dict[str, fx.Node] = {}
        self.weights = {name for name, p in self.table.items() if p.kind == "weight"}
        calls: dict[str, list[fx.Node]] = defaultdict(list)
        quantizers = {p.quantizer: name for name, p in self.table.items() if p.kind != "weight"}
        for node in gm.graph.nodes:
            if node.op == "call_module":
                target = str(node.target)
                if target in quantizers:
                    self.nodes[quantizers[target]] = node
                else:
                    calls[target].append(node)
        for name, point in self.table.items():
            if name in self.nodes:
                for member in point.members:
                    self.nodes.setdefault(member, self.nodes[name])
        self.ambiguous = {t: [n.name for n in ns] for t, ns in calls.items() if len(ns) > 1}
        for target, nodes in calls.items():
            if len(nodes) == 1:
                self.nodes.setdefault(target, nodes[0])
        for node in gm.graph.nodes:
            if node.op != "output" and node.name not in self.ambiguous:
                self.nodes.setdefault(node.name, node)

    def names(self) -> list[str]:
        """The names to show a user: quant points (activations and inputs) of a prepared model,
        else module paths."""
        if self.table:
            return [n for n, p in self.table.items() if p.kind != "weight"]
        return [str(n.target) for n in self.gm.graph.nodes
                if n.op == "call_module" and str(n.target) not in self.ambiguous]

    def node(self, name: str, where: str = "distillation layer") -> fx.Node:
        if name in self.nodes:
            return self.nodes[name]
        if name in self.weights:
            layer = self.table[name].layer
            output = next((n for n, p in self.table.items() if p.kind != "weight" and layer in p.members), layer)
            raise LayerNotFoundError(
                f"{where} {name!r} is a weight quant point; distillation and the Hessian trace use "
                f"activations (the output of that layer is {output!r})"
            )
        if name in self.ambiguous:
            raise LayerNotFoundError(
                f"{where} {name!r} is called at {len(self.ambiguous[name])} places; name one call "
                f"site: {', '.join(self.ambiguous[name])} (deployq.prepare names them NAME_dupN)"
            )
        known = self.names()
        close = difflib.get_close_matches(name, known, n=5, cutoff=0.4)
        hint = f" Nearest names: {', '.join(close)}." if close else ""
        raise LayerNotFoundError(
            f"{where} {name!r} is not in the model ({len(known)} layers).{hint} "
            "List them all with `deployq inspect`."
        )


def expose(gm: fx.GraphModule, names: Sequence[str], where: str = "distillation layer") -> fx.GraphModule:
    """A GraphModule computing ``(original_output, {name: activation})`` for `names`.

    The graph is copied and its output node rewritten; the modules (weights, quantizers, the
    quant-point table) are the same objects as `gm`'s, so training the result trains `gm`.
    Unknown names raise :class:`LayerNotFoundError` with the nearest real names.
    """
    names = list(dict.fromkeys(names))
    if not names:
        raise DistillError(f"no {where}s given")
    index = LayerIndex(gm)
    targets = {name: index.node(name, where) for name in names}
    graph = fx.Graph()
    value_map: dict[fx.Node, fx.Node] = {}
    output = graph.graph_copy(gm.graph, value_map)
    graph.output((output, {name: value_map[node] for name, node in targets.items()}))
    graph.lint()
    exposed = fx.GraphModule(gm, graph, type(gm).__name__)
    exposed._modules.clear()  # share gm's whole module tree (in its order), not partial copies
    for child_name, child in gm.named_children():
        setattr(exposed, child_name, child)
    exposed.training = gm.training
    return exposed


# -------------------------------------------------------------------------------- settings


def _check_weight(name: str, value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise DistillError(f"{where}: the weight of {name!r} must be a number > 0, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class DistillConfig:
    """Which layers to distill with which weight λ, and what the teacher is."""

    layers: tuple[tuple[str, float], ...]
    quant_teacher: bool = False
    teacher_weights: Optional[str] = None  # float state_dict of the teacher; None = the student's

    def __post_init__(self) -> None:
        if not self.layers:
            raise DistillError("distillation needs at least one layer")
        names = [n for n, _ in self.layers]
        if len(set(names)) != len(names):
            twice = sorted({n for n in names if names.count(n) > 1})
            raise DistillError(f"distillation layers named twice: {', '.join(twice)}")
        for name, weight in self.layers:
            _check_weight(name, weight, "distill.layers")
        if not isinstance(self.quant_teacher, bool):
            raise DistillError(f"quant_teacher must be true or false, got {self.quant_teacher!r}")

    @property
    def weights(self) -> dict[str, float]:
        return dict(self.layers)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.layers]

    def to_dict(self) -> dict[str, Any]:
        """The native form, ``{"distill": {...}}``."""
        section: dict[str, Any] = {"layers": dict(self.layers), "quant_teacher": self.quant_teacher}
        if self.teacher_weights is not None:
            section["teacher_weights"] = self.teacher_weights
        return {"distill": section}


NATIVE_KEYS = {"layers", "quant_teacher", "teacher_weights"}
SEEDS_KEYS = ("distill_config", "distill_coeff", "output_layer_list")


def _name_list(value: Any, key: str, source: str) -> list[str]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise DistillError(f"{source}: {key} must be a list of layer names, got {value!r}")
    return list(value)


def _from_native(section: Any, source: str) -> DistillConfig:
    where = f"{source}: distill"
    if not isinstance(section, Mapping):
        raise DistillError(f"{where} must be a mapping with 'layers' (name: weight) and optionally quant_teacher")
    unknown = set(section) - NATIVE_KEYS
    if unknown:
        raise DistillError(f"{where}: unknown keys {sorted(unknown)}; known: {', '.join(sorted(NATIVE_KEYS))}")
    layers = section.get("layers")
    if not isinstance(layers, Mapping) or not layers:
        raise DistillError(f"{where}.layers must map layer names to weights, e.g. {{enc1.2: 0.5}}")
    pairs = tuple((str(n), _check_weight(str(n), w, f"{where}.layers")) for n, w in layers.items())
    teacher = _optional_path(section.get("teacher_weights"), f"{where}.teacher_weights")
    return DistillConfig(pairs, section.get("quant_teacher", False), teacher)


def _optional_path(value: Any, where: str) -> Optional[str]:
    if value is None or value == "":
        return None
    if not isinstance(value, (str, Path)):
        raise DistillError(f"{where} must be a file path, got {value!r}")
    return str(value)


def _from_seeds(doc: Mapping[str, Any], source: str) -> DistillConfig:
    """``distill_config`` + ``distill_coeff`` (same length; one number applies to all), with
    ``output_layer_list`` (the layers the graph outputs) naming the same layers if given."""
    outputs = _name_list(doc["output_layer_list"], "output_layer_list", source) if "output_layer_list" in doc else None
    names = _name_list(doc["distill_config"], "distill_config", source) if "distill_config" in doc else outputs
    if names is None:
        raise DistillError(f"{source}: distill_coeff without distill_config (the layers it weights)")
    if outputs is not None and set(outputs) != set(names):
        raise DistillError(
            f"{source}: output_layer_list and distill_config name different layers "
            f"(only in output_layer_list: {sorted(set(outputs) - set(names))}, only in distill_config: "
            f"{sorted(set(names) - set(outputs))}); every output layer is distilled, so list the same layers"
        )
    coeff = doc.get("distill_coeff", 1.0)
    if isinstance(coeff, (int, float)) and not isinstance(coeff, bool):
        coeff = [coeff] * len(names)
    if not isinstance(coeff, (list, tuple)):
        raise DistillError(f"{source}: distill_coeff must be a list of numbers, got {coeff!r}")
    if len(coeff) != len(names):
        raise DistillError(
            f"{source}: distill_coeff has {len(coeff)} values but distill_config names {len(names)} "
            f"layers ({', '.join(names)}); give one weight per layer"
        )
    pairs = tuple((n, _check_weight(n, w, f"{source}: distill_coeff")) for n, w in zip(names, coeff))
    quant_teacher = doc.get("quant_teacher", False)
    if not isinstance(quant_teacher, bool):
        raise DistillError(f"{source}: quant_teacher must be true or false, got {quant_teacher!r}")
    teacher = _optional_path(doc.get("load_teacher_model"), f"{source}: load_teacher_model")
    return DistillConfig(pairs, quant_teacher, teacher)


def from_dict(doc: Mapping[str, Any] | None, source: str = "config") -> Optional[DistillConfig]:
    """The distillation settings of a recipe / config document (native ``distill:`` section or
    the seeds' top-level keys); None when the document asks for no distillation."""
    if doc is None:
        return None
    if not isinstance(doc, Mapping):
        raise DistillError(f"{source}: expected a mapping at the top level, got {type(doc).__name__}")
    seeds = [k for k in SEEDS_KEYS if k in doc]
    if "distill" in doc and seeds:
        raise DistillError(f"{source}: both a 'distill' section and the seeds' keys {seeds}; use one form")
    if "distill" in doc:
        return None if doc["distill"] is None else _from_native(doc["distill"], source)
    if seeds:
        return _from_seeds(doc, source)
    return None


def load(source: str | Path | Mapping[str, Any] | DistillConfig | None) -> Optional[DistillConfig]:
    """Distillation settings from a YAML file, a document (mapping), or a DistillConfig."""
    if source is None or isinstance(source, DistillConfig):
        return source
    if isinstance(source, Mapping):
        return from_dict(source)
    path = Path(source)
    config = from_dict(read_yaml(path, "distillation config", DistillError), str(path))
    if config is None:
        raise DistillError(f"{path} has no distillation settings (a 'distill' section or distill_config)")
    return config


# ------------------------------------------------------------------------------------ losses


class DistillationLoss(nn.Module):
    """Σ_i λ_i · MSE(t_i, s_i) over the distillation layers (FitNets, Romero et al. 2015).

    The teacher's features are constants (detached). Exactly 0 when every s_i equals t_i.
    """

    def __init__(self, weights: Mapping[str, float]) -> None:
        super().__init__()
        if not weights:
            raise DistillError("DistillationLoss needs at least one layer")
        self.weights = {str(n): _check_weight(str(n), w, "DistillationLoss") for n, w in weights.items()}

    def terms(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The unweighted MSE of every layer."""
        out = {}
        for name in self.weights:
            if name not in student or name not in teacher:
                side = "student" if name not in student else "teacher"
                raise DistillError(f"distillation layer {name!r}: the {side} does not output it")
            s, t = student[name], teacher[name]
            if s.shape != t.shape:
                raise DistillError(f"distillation layer {name!r}: student shape {tuple(s.shape)} "
                                   f"!= teacher shape {tuple(t.shape)}")
            out[name] = F.mse_loss(s, t.detach())
        return out

    def forward(self, student: Mapping[str, torch.Tensor], teacher: Mapping[str, torch.Tensor]) -> torch.Tensor:
        terms = self.terms(student, teacher)
        return sum(self.weights[name] * value for name, value in terms.items())


class Teacher:
    """The model the student learns from, with its distillation layers exposed.

    Always in eval mode, without gradients (its parameters are frozen and it runs under
    ``torch.no_grad``). Not an nn.Module on purpose: no parent's ``.train()`` reaches it.
    """

    def __init__(self, model: fx.GraphModule, layers: Sequence[str]) -> None:
        model.requires_grad_(False)
        self.model = expose(model.eval(), layers)

    def __call__(self, *inputs: torch.Tensor) -> tuple[Any, dict[str, torch.Tensor]]:
        self.model.eval()
        with torch.no_grad():
            return self.model(*inputs)
