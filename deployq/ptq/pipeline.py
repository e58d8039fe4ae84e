"""Post-training quantization as ``deployq export --calib DATA --ptq METHODS`` runs it.

    float model ─ cle ─► prepare ─► calibrate (or: search) ─► adaround ─► bias ─► export

| method     | what it does                                                           | module             |
|------------|------------------------------------------------------------------------|--------------------|
| ``cle``    | cross-layer equalization of the float model (ReLU / LeakyReLU pairs)   | :mod:`.equalize`   |
| ``search`` | each activation's calibration method picked by the output it gives     | :mod:`.calibration_search` |
| ``adaround`` | learned up/down rounding of every weight, layer by layer             | :mod:`.adaround`   |
| ``bias``   | the expected output error of every layer subtracted from its bias      | :mod:`.bias_correction` |

``--calib zeroq`` calibrates on inputs synthesized from the model's BatchNorm statistics
(:mod:`.zeroq`) instead of data. ``reference`` is the prepared model as it was before AdaRound
and bias correction changed its float parameters: it is what the float ONNX model is exported
from, so ``deployq diff`` still compares the integer model with the user's float model (after
CLE, which keeps the float function, every tensor of the equalized model is what the float graph
computes; its per-channel scales differ, so CLE's model is the reference for every later step).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import fx, nn

from deployq.core.progress import stage
from deployq.ptq.adaround import KEPT_NEAREST, AdaRoundReport, adaround
from deployq.ptq.bias_correction import SHRINK, SIGNIFICANCE, correct_bias, float_targets
from deployq.ptq.batched import model_outputs
from deployq.ptq.calibration_search import mean_output_sqnr_db, search_calibration
from deployq.ptq.equalize import equalize
from deployq.ptq.layers import FloatPass
from deployq.ptq.zeroq import distilled_data
from deployq.qat.calibrate import calibrate, first_samples, input_names, model_inputs, samples_in, set_mode

__all__ = ["METHODS", "HeldOut", "PTQOptions", "PTQResult", "REFINE_SAMPLES", "ZEROQ", "better_of_equalization",
           "parse_methods", "quantize_post_training", "zeroq_feeds"]

METHODS = ("cle", "search", "adaround", "bias")
ZEROQ = "zeroq"  # the --calib value that asks for data-free calibration
# AdaRound's best of 8, 32 and 64 on MTCNN PNet/RNet/ONet (3 calibration draws, 256 crops of other photographs,
# bench_budgets.py): +0.32 dB on average; bias correction lost there at every budget (-0.17 to -0.29 dB)
REFINE_SAMPLES = 64


def parse_methods(text: Optional[str]) -> tuple[str, ...]:
    """``"cle,adaround"`` -> ("cle", "adaround"), in pipeline order; unknown names are an error."""
    names = [n.strip().lower() for n in (text or "").split(",") if n.strip()]
    unknown = sorted(set(names) - set(METHODS))
    if unknown:
        raise ValueError(f"--ptq: unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    return tuple(m for m in METHODS if m in names)


@dataclass(frozen=True)
class PTQOptions:
    """The methods (a subset of :data:`METHODS`) and their budgets."""

    methods: tuple[str, ...] = ()
    adaround_iterations: int = 200  # optimization steps per layer
    refine_samples: int = REFINE_SAMPLES  # calibration samples AdaRound and bias correction learn from
    search_samples: int = 8  # calibration samples the search scores its choices on (held out)
    bias_shrink: float = SHRINK  # per-sample standard deviations each bias correction stays short of the mean

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", parse_methods(",".join(self.methods)))
        if min(self.adaround_iterations, self.refine_samples, self.search_samples) < 1:
            raise ValueError("adaround_iterations, refine_samples and search_samples must be at least 1")
        if not self.bias_shrink >= 0:
            raise ValueError(f"bias_shrink must be 0 or more, got {self.bias_shrink}")


@dataclass
class PTQResult:
    model: fx.GraphModule  # calibrated, in quantize mode
    reference: Optional[fx.GraphModule]  # the model before AdaRound / bias correction (None: `model`)
    notes: list[str] = field(default_factory=list)


def equalized(float_model: nn.Module, example_inputs: tuple, options: PTQOptions) -> tuple[nn.Module, list[str]]:
    """The float model after CLE (when asked), and a note saying what it did."""
    if "cle" not in options.methods:
        return float_model, []
    model, report = equalize(float_model, example_inputs)
    if not report.pairs:  # a method that changes nothing says so, and why
        reasons = "; ".join(reason for _, reason in report.skipped[:3]) or (
            "it rescales pairs of layers joined only by BatchNorm and ReLU or LeakyReLU; this model has none")
        return float_model, [f"cle changed nothing: no layer pair can be equalized ({reasons}"
                             + (f"; and {len(report.skipped) - 3} more" if len(report.skipped) > 3 else "") + ")"]
    return model, [f"cle: {len(report.pairs)} layer pairs equalized, {len(report.skipped)} left as they are "
                   "(ReLU6, residual branches and other non-homogeneous pairs)"]


def better_of_equalization(plain: fx.GraphModule, equalized_model: fx.GraphModule, batches: Sequence[Any], *,
                           limit: int = 100) -> tuple[bool, Optional[str]]:
    """Whether to keep CLE: copies of both prepared models calibrated on `batches`, each scored by
    its output SQNR on them (CLE learns nothing from data, so the calibration samples are a fair
    test of it; each model against its own float outputs, which CLE keeps equal). (keep, note):
    the note says why CLE is undone. On the trained digits CNN and low-light network CLE lowered
    that score (37.06 -> 35.88 and 32.60 -> 31.88 dB) as it lowered the held-out one (34.68 ->
    34.42, 31.92 -> 31.28)."""
    scores = []
    for prepared in (plain, equalized_model):
        model = copy.deepcopy(prepared)
        calibrate(model, batches, max_batches=limit, progress=False)
        check = HeldOut(model.eval(), list(batches[:limit]))
        scores.append(check.score)
    if scores[0] is None or scores[1] >= scores[0]:
        return True, None
    return False, (f"cle: undone, it lowered the output SQNR on the {check.samples} calibration samples from "
                   f"{scores[0]:.2f} to {scores[1]:.2f} dB")


def quantize_post_training(model: fx.GraphModule, batches: Sequence[Any], options: PTQOptions, *,
                           limit: int = 100, progress: bool = True) -> PTQResult:
    """Calibrate the prepared `model` on `batches` (at most `limit`), then refine as `options` say."""
    notes = []
    if "search" in options.methods:
        stage("ptq: choosing each activation's calibration method (minmax, percentile, mse, kl)", progress)
        report = search_calibration(model, batches, max_batches=limit, eval_samples=options.search_samples,
                                    progress=progress)
        where = (f"{report.scored_samples} held-out calibration samples" if report.held_out else
                 f"the {report.scored_samples} calibration samples it observed (too few to hold some out)")
        notes.append(f"search: mean output SQNR on {where} {report.sqnr_start_db:.2f} -> "
                     f"{report.sqnr_end_db:.2f} dB; methods chosen: "
                     + ", ".join(f"{m} x {n}" for m, n in report.counts().items()))
    else:
        calibrate(model, batches, max_batches=limit, progress=progress)
    model.eval()
    refine = [m for m in ("adaround", "bias") if m in options.methods]
    if not refine:
        return PTQResult(model, None, notes)
    reference = copy.deepcopy(model)
    learn = first_samples(batches, options.refine_samples)
    held_out = list(batches[len(learn):limit])  # the calibration samples beyond the learned ones
    targets = None
    if not held_out and "bias" in refine:  # one float pass: the check's reference, bias correction's targets
        targets = float_targets(model, learn, max_batches=len(learn))
    check = HeldOut(model, held_out or learn, learned=not held_out, reference=targets and targets.outputs)
    notes.append(check.describe(sum(samples_in(b) for b in learn)))
    for method in refine:
        before = copy.deepcopy(model.state_dict())
        note, outputs = _refine(method, model, learn, reference, options, progress, targets)
        notes.append(note)
        undone = check.undo(method, model, outputs if check.learned else None)
        if undone:
            model.load_state_dict(before)
            notes.append(undone)
    return PTQResult(model, reference, notes)


def _refine(method: str, model: fx.GraphModule, learn: list, reference: fx.GraphModule, options: PTQOptions,
            progress: bool, targets: Optional[FloatPass] = None) -> tuple[str, Optional[list]]:
    """Run AdaRound or bias correction on `model`, learning from `learn` (bias correction's float
    `targets` where already taken): the note saying what it did, and the refined model's outputs
    on `learn` where the method computed them (else None)."""
    learned_from = f"{sum(samples_in(b) for b in learn)} calibration samples"
    if method == "adaround":
        stage("ptq: AdaRound, layer by layer", progress)
        report = adaround(model, learn, iterations=options.adaround_iterations, max_batches=len(learn),
                          reference=reference, progress=progress)
        flipped = sum(layer.flipped for layer in report.layers) / max(1, len(report.layers))
        return (f"adaround: {len(report.layers)} layers, {flipped:.1%} of weights rounded away from nearest "
                f"on average ({options.adaround_iterations} steps per layer on {learned_from})"
                + kept_nearest_text(report)), None
    stage("ptq: bias correction, layer by layer", progress)
    report = correct_bias(model, learn, max_batches=len(learn), reference=reference, progress=progress,
                          targets=targets, shrink=options.bias_shrink)
    shrunk = (f", or under {options.bias_shrink:g} of its spread over samples; the others corrected by their "
              f"mean error less {options.bias_shrink:g} of that spread" if options.bias_shrink else "")
    note = (f"bias: {len(report.layers)} layers corrected on {learned_from}; {report.within_noise} of "
            f"{report.channels} channels left as they were (their mean error within "
            f"{SIGNIFICANCE:g} standard errors of zero{shrunk})"
            + (f", {len(report.skipped)} without a bias or BatchNorm left alone" if report.skipped else ""))
    return note, report.outputs


def kept_nearest_text(report: AdaRoundReport) -> str:
    """What the AdaRound note adds about the layers left at nearest rounding, and why."""
    counts = {reason: sum(layer.kept_nearest == reason for layer in report.layers) for reason in KEPT_NEAREST}
    kept = [f"{n} ({KEPT_NEAREST[reason]})" for reason, n in counts.items() if n]
    return "; nearest rounding kept on " + ", ".join(kept) if kept else ""


class HeldOut:
    """The model's outputs against its float outputs (mean per-output SQNR, dB) on the calibration
    samples AdaRound and bias correction do not learn from: a method that lowers that score is
    undone, so ``--ptq`` does not leave a model worse than plain calibration on data it has not fit.
    The samples are those beyond the first ``--refine-samples``. Where there are none (`learned`),
    each method is checked on the samples it learned from instead: one that makes even those worse
    has failed at its own task. On the PP-OCR direction classifier (32 calibration lines), bias
    correction lowered the output SQNR on its own lines in 2 of 3 draws (29.2 -> 23.8 and 41.0 ->
    30.9 dB), and there it lowered it on 256 unseen lines too (35.6 -> 32.3, 37.7 -> 31.7); the
    third draw gained on its lines (21.7 -> 26.3) and lost 4.1 dB on those 256 unseen lines, gained
    3.1-9.0 dB on three other draws of 256, and changed by -0.25 dB on 1024: the softmax SQNR is
    decided by the few lines near the decision boundary, which 32 lines rarely hold. No check on
    calibration samples sees data unlike them: on MTCNN, bias correction learned on crops of three
    photographs loses 0.2-0.3 dB on average on crops of three others (``bench_budgets.py``).
    Measured before: holding a quarter of a small set out of the methods cost more than it saved
    (bias correction 40.5 -> 38.1 dB on the classifier, 12.9 -> 12.3 dB on the recognizer, 64
    unseen inputs); a two-fold check (each method learning from one half and
    scored on the other, applied on all only if it gained) tripled the method's time and withheld
    bias correction from one detector draw where the two others gained 0.8-1.5 dB. A paired test
    over the samples (keep a method only if its per-sample error reductions are significant) does
    not separate the cases either: the classifier draw above gains with t = 1.08 (one line 92 % of
    the gain) and loses 4.1 dB unseen, a recognizer draw gains with t = 0.28 and gains 2.0 dB
    unseen."""

    def __init__(self, model: fx.GraphModule, batches: list, *, learned: bool = False,
                 reference: Optional[list] = None) -> None:
        """`reference`: the model's float outputs on `batches` (grouped as :func:`model_outputs`
        groups them) where the caller has them; else they are computed here."""
        names = input_names(model)
        self.inputs = [model_inputs(b, names) for b in batches]
        self.samples = sum(samples_in(b) for b in batches)
        self.learned = learned
        self.score = None
        if self.inputs:
            if reference is None:
                set_mode(model, "float")
                reference = model_outputs(model, self.inputs)
                set_mode(model, "quantize")
            self.reference = reference
            self.shapes = [[t.shape for t in run] for run in self.reference]
            self.score = self.measure(model)

    @property
    def where(self) -> str:
        return (f"the {self.samples} calibration samples it learned from" if self.learned else
                f"the {self.samples} held-out calibration samples")

    def measure(self, model: fx.GraphModule) -> float:
        """`model`'s mean per-output SQNR against the float outputs taken when this check was made."""
        return mean_output_sqnr_db(self.reference, model_outputs(model, self.inputs))

    def describe(self, learned: int) -> str:
        if self.score is None:
            return "held-out check: none, no calibration sample to check on"
        if self.learned:
            return (f"held-out check: none, all {learned} calibration samples are learned from (give more "
                    "calibration inputs than --refine-samples to check each method on the rest); each method "
                    f"is checked on them instead, output SQNR {self.score:.2f} dB after calibration")
        return (f"held-out check: output SQNR on the {self.samples} calibration samples not learned from, "
                f"{self.score:.2f} dB after calibration")

    def undo(self, method: str, model: fx.GraphModule, outputs: Optional[list] = None) -> Optional[str]:
        """A note if `method` lowered the checked score (then the caller restores the model), else
        None. `outputs`: the model's outputs on the checked samples where the method computed them
        (grouped as :func:`model_outputs` groups them), which spares running the model again."""
        if self.score is None:
            return None
        same_shapes = outputs is not None and [[t.shape for t in run] for run in outputs] == self.shapes
        now = mean_output_sqnr_db(self.reference, outputs) if same_shapes else self.measure(model)
        if now >= self.score:
            self.score = now
            return None
        return f"{method}: undone, it lowered the output SQNR on {self.where}: {self.score:.2f} -> {now:.2f} dB"


def zeroq_feeds(float_model: nn.Module, names_and_shapes: Sequence[tuple[str, tuple[int, ...]]], count: int, *,
                steps: int = 200, batch: int = 16, progress: bool = True) -> list[dict[str, torch.Tensor]]:
    """`count` calibration inputs (one sample each) synthesized from the model's BatchNorm statistics."""
    if len(names_and_shapes) != 1:
        raise ValueError(f"--calib {ZEROQ}: data-free calibration takes models with one input; this one has "
                         f"{len(names_and_shapes)}")
    name, shape = names_and_shapes[0]
    per_batch = max(1, min(batch, count))
    batches = -(-count // per_batch)
    stage(f"calibration: synthesizing {count} inputs from BatchNorm statistics (ZeroQ, {steps} steps)", progress)
    data = distilled_data(float_model, (per_batch, *tuple(shape)[1:]), batches=batches, steps=steps, progress=progress)
    items = [t[i:i + 1] for t in data.batches for i in range(t.shape[0])][:count]
    return [{name: x} for x in items]
