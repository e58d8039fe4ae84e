"""QuantSpec: how one tensor is quantized (bits, signedness, scheme, quantizer, observer).

A small frozen dataclass that validates itself, so a spec that exists is a spec that works.
Schemes use the names of the seeds' configs and of torch: ``per_tensor_affine``,
``per_tensor_symmetric``, ``per_channel_affine``, ``per_channel_symmetric``; a spec can be
written in the seeds' short form ``"10 per_channel_affine"``.

The observer ``auto`` (the default) is ``minmax`` at more than ``LOW_BITS`` bits and ``mse`` at
``LOW_BITS`` or fewer, where a few outliers stretching the min/max range leave most values on one
or two codes. Measured at 4-bit weights (output SQNR on held-out inputs, `min/max -> mse`): the
digits CNN 7.74 -> 14.35 dB, the low-light network 22.68 -> 23.60, MTCNN's PNet 13.39 -> 17.60,
RNet 17.31 -> 17.53, ONet 23.26 -> 24.23, PP-OCR's direction classifier 6.96 -> 11.19; at 4-bit
activations the digits CNN 16.20 -> 17.23 and the low-light network 1.29 -> 8.81. At 8 bits
min/max stays: every earlier result and checkpoint is unchanged. A spec written with a named
observer keeps it at any width.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

from deployq.core.qformula import MAX_BITS, MIN_BITS, CodeRange, qrange

AUTO_OBSERVER = "auto"
LOW_BITS = 4  # at this width and below, ``auto`` is ``mse``

SCHEMES: dict[str, tuple[bool, bool]] = {  # name -> (per_channel, symmetric)
    "per_tensor_affine": (False, False),
    "per_tensor_symmetric": (False, True),
    "per_channel_affine": (True, False),
    "per_channel_symmetric": (True, True),
}


def _freeze_args(args: Any, what: str) -> tuple[tuple[str, Any], ...]:
    if args is None:
        return ()
    if isinstance(args, Mapping):
        items = args.items()
    elif isinstance(args, tuple):
        items = args
    else:
        raise TypeError(f"{what} must be a mapping of keyword arguments, got {type(args).__name__}")
    out = []
    for key, value in items:
        if isinstance(value, list):
            value = tuple(value)
        out.append((str(key), value))
    return tuple(sorted(out))


@dataclass(frozen=True)
class QuantSpec(CodeRange):
    bits: int = 8
    signed: bool = False
    symmetric: bool = False
    per_channel: bool = False
    quantizer: str = "fixed"
    observer: str = AUTO_OBSERVER
    quantizer_args: tuple[tuple[str, Any], ...] = ()
    observer_args: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise ValueError(f"bits must be an integer from {MIN_BITS} to {MAX_BITS}, got {self.bits!r}")
        qrange(self.bits, self.signed)  # validates the width
        for flag in ("signed", "symmetric", "per_channel"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be true or false, got {getattr(self, flag)!r}")
        object.__setattr__(self, "quantizer_args", _freeze_args(self.quantizer_args, "quantizer_args"))
        object.__setattr__(self, "observer_args", _freeze_args(self.observer_args, "observer_args"))
        if self.observer == AUTO_OBSERVER and self.observer_args:
            raise ValueError("observer_args need a named observer (e.g. observer: mse), not auto")

    @property
    def observer_name(self) -> str:
        """The observer that runs: the named one, or what ``auto`` is at this width."""
        if self.observer != AUTO_OBSERVER:
            return self.observer
        return "mse" if self.bits <= LOW_BITS else "minmax"

    @property
    def observer_searches(self) -> bool:
        """Whether the observer searches for its range (every one but min/max): costly to rerun."""
        return self.observer_name != "minmax"

    @property
    def observer_label(self) -> str:
        """The observer that runs with its arguments, as ``qparams.json`` records it: ``minmax``,
        ``percentile(lower=0.001, upper=99.999)``."""
        if not self.observer_args:
            return self.observer_name
        return f"{self.observer_name}({', '.join(f'{k}={v}' for k, v in self.observer_args)})"

    @property
    def scheme(self) -> str:
        return f"per_{'channel' if self.per_channel else 'tensor'}_{'symmetric' if self.symmetric else 'affine'}"

    def describe(self) -> str:
        sign = "s" if self.signed else "u"
        return f"{sign}{self.bits} {self.scheme}"

    def updated(self, changes: Mapping[str, Any] | str | int | None) -> "QuantSpec":
        """A copy with `changes` applied: a mapping of fields, a short string
        ``"10 per_channel_affine"`` (bits, then an optional scheme), or a bare bit width."""
        if changes is None:
            return self
        fields = parse_changes(changes)
        return dataclasses.replace(self, **fields)

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "signed": self.signed,
            "symmetric": self.symmetric,
            "per_channel": self.per_channel,
            "quantizer": self.quantizer,
            "observer": self.observer,
            "quantizer_args": dict(self.quantizer_args),
            "observer_args": dict(self.observer_args),
        }


_FIELDS = {f.name for f in dataclasses.fields(QuantSpec)}


def parse_changes(changes: Mapping[str, Any] | str | int) -> dict[str, Any]:
    """Turn a config value into QuantSpec fields; ``scheme`` expands to per_channel + symmetric."""
    if isinstance(changes, bool):
        raise ValueError(f"a quantization setting cannot be {changes!r}")
    if isinstance(changes, int):
        return {"bits": changes}
    if isinstance(changes, str):
        words = changes.split()
        if not words:
            raise ValueError("empty quantization setting")
        try:
            fields: dict[str, Any] = {"bits": int(words[0])}
        except ValueError:
            raise ValueError(
                f"cannot read {changes!r}: expected '<bits> [scheme]', e.g. '10 per_channel_affine'"
            ) from None
        if len(words) > 2:
            raise ValueError(f"cannot read {changes!r}: expected '<bits> [scheme]'")
        if len(words) == 2:
            fields.update(parse_changes({"scheme": words[1]}))
        return fields
    if not isinstance(changes, Mapping):
        raise ValueError(f"a quantization setting must be a mapping, a string or an integer, got {changes!r}")
    fields = {}
    for key, value in changes.items():
        if key == "scheme":
            if value not in SCHEMES:
                raise ValueError(f"unknown scheme {value!r}; known: {', '.join(SCHEMES)}")
            fields["per_channel"], fields["symmetric"] = SCHEMES[value]
        elif key in _FIELDS:
            fields[key] = value
        else:
            raise ValueError(
                f"unknown quantization setting {key!r}; known: scheme, {', '.join(sorted(_FIELDS))}"
            )
    return fields


DEFAULT_WEIGHT = QuantSpec(bits=8, signed=True, symmetric=True, per_channel=True)
DEFAULT_ACTIVATION = QuantSpec(bits=8, signed=False, symmetric=False, per_channel=False)
