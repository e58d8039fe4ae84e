"""deployq train: quantization-aware training with feature distillation, from a recipe.

    float model + float weights ─ prepare ─► student (QAT GraphModule)
      ─ calibrate once (~100 batches; merged over ranks) ─► initial scales
      ─ epochs of  L_task + Σ_i λ_i·MSE(teacher_i, student_i)  ─ metric on val every epoch
      ─► best.pt / last.pt (deployq checkpoints), metrics.csv / metrics.json, state.pt (resume)

The thesis' rules are built in: QAT starts from the float weights (``model.weights`` is
required), calibration runs once, and the teacher is the float model (fake-quantized with the
student's calibrated qparams when ``quant_teacher`` is set). Every recipe error (a missing key,
a distillation layer the model does not have, data that does not fit the model) is raised
before the first training step.

A recipe (YAML; relative paths are relative to the recipe's folder)::

    model:
      factory: deployq.examples.zoo:unet      # package.module:function, imported because you named it
      kwargs: {width: 8}
      weights: float.pth                      # plain state_dict (the seeds: load_model)
    quant_config: quant.yaml                  # path or inline mapping; native or the seeds' form
    data:
      kind: deployq.examples.lowlight.data:SyntheticLowLight   # | npz | tensors (Python) | pkg.mod:function
      size: 64
      ratios: [100, 250, 300]
      train: {length: 512}
      val: {length: 32}
    loss: deployq.examples.lowlight.loss:lowlight_loss   # l1 | mse | cross_entropy | pkg.mod:function
    metric: psnr                              # psnr | accuracy (default: accuracy for cross_entropy)
    distill:
      layers: {DBF.DBF_conv9.lrelu_dup1: 0.35, DBLE.dual_conv9.lrelu_dup1: 0.35}
      quant_teacher: false
    optimizer: adam                           # | sgd (momentum)
    lr: 1.0e-4
    epochs: 20
    batch_size: 4
    calibration_batches: 100
    freeze_bn_epoch: 15                       # BN statistics frozen from this epoch on (1-based)
    compile: true                             # the quantizers' fused kernels (C on the CPU, torch.compile on CUDA; false: eager)
    input_shape: [1, 4, 64, 64]               # recorded for export (default: one training item)
    output_dir: runs/qat

The seeds' keys are read too: ``load_model``, ``load_teacher_model``, ``config_file_path``,
``extra_quantizer_dict``, ``distill_config``, ``distill_coeff``, ``output_layer_list``,
``quant_teacher``, ``batch_size``; their other keys (``gpu_id``, ``debug``, ...) are ignored with a
note. Under ``torchrun --nproc_per_node=N`` the same recipe runs with DistributedDataParallel;
only rank 0 writes files.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import math
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter
from typing import Any, Callable, Mapping, Optional

import numpy as np
import torch
from torch import fx, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, Subset

from deployq.core import qparams as qp
from deployq.core.files import AtomicOutputs, json_text
from deployq.core.progress import progress_bar
from deployq.qat import checkpoint as ck
from deployq.qat.calibrate import (calibrate, freeze_bn_stats, load_qparams, qparams_of, set_mode,
                                   weights_searched_every_step)
from deployq.qat.fake_quant import use_compiled_kernels
from deployq.train import distill as dst
from deployq.train import distributed as dd
from deployq.train import losses
from deployq.train.data import RecipeError, build_dataset
from deployq.train.metrics import METRICS, Metric
from deployq.train.models import Models, build_models, collate
from deployq.train.recipe import Recipe, load_recipe

STATE_FORMAT, STATE_VERSION = "deployq-train-state", 1
CHECKPOINTS = ("best.pt", "last.pt")
STATE_FILE = "state.pt"



@dataclass
class TrainResult:
    model: fx.GraphModule  # the student after the last epoch (calibrated, quantize mode)
    history: list[dict[str, Any]]
    best_value: Optional[float]
    best_epoch: Optional[int]
    output_dir: Path
    is_main: bool
    notes: tuple[str, ...] = ()

    @property
    def checkpoints(self) -> dict[str, Path]:
        return {name.removesuffix(".pt"): self.output_dir / name for name in CHECKPOINTS}


def _to(batch: losses.Batch, device: torch.device) -> losses.Batch:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _train_loader(dataset: Dataset, recipe: Recipe, ctx: dd.Context, epoch: int) -> DataLoader:
    """Shuffled with a seed per epoch (so resumed runs see the same order); sharded over ranks."""
    if ctx.distributed:
        sampler = DistributedSampler(dataset, ctx.world_size, ctx.rank, shuffle=True, seed=recipe.seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(recipe.seed + epoch))
    return DataLoader(dataset, batch_size=recipe.batch_size, sampler=sampler, num_workers=recipe.num_workers,
                      collate_fn=collate)


def _optimizer(recipe: Recipe, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    if recipe.optimizer == "sgd":
        return torch.optim.SGD(params, lr=recipe.lr, momentum=recipe.momentum, weight_decay=recipe.weight_decay)
    # torch's fused Adam (one kernel over all tensors) where every parameter allows it: a QAT model
    # has ~4x the float model's parameter tensors (each quantizer's scale, zero point, alpha)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype in (torch.float32, torch.float64) for p in params)
    return torch.optim.Adam(params, lr=recipe.lr, weight_decay=recipe.weight_decay, fused=fused or None)


def _output_state(recipe: Recipe, resume: bool) -> Optional[dict[str, Any]]:
    """The saved training state when resuming; refuses to overwrite a run without --resume."""
    path = recipe.output_dir / STATE_FILE
    if not resume:
        if path.exists():
            raise RecipeError(f"{recipe.output_dir} already holds a run ({STATE_FILE}); pass --resume to "
                              "continue it, or choose another output_dir")
        return None
    if not path.is_file():
        raise RecipeError(f"nothing to resume: {path} does not exist")
    state = ck.read_payload(path)
    if not (isinstance(state, dict) and state.get("format") == STATE_FORMAT and state.get("version") == STATE_VERSION):
        raise RecipeError(f"{path} is not a deployq training state (version {STATE_VERSION})")
    if state["epoch"] >= recipe.epochs:
        raise RecipeError(f"{path}: the run already has {state['epoch']} epochs and the recipe asks for "
                          f"{recipe.epochs}; pass --epochs N with N > {state['epoch']} to train more")
    return state


@dataclass
class _Objective:
    loss: losses.TaskLoss
    distill: Optional[dst.DistillationLoss]
    teacher: Optional[dst.Teacher]

    def __call__(self, net: nn.Module, batch: losses.Batch) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(total, task, {layer: unweighted MSE}) of one batch."""
        if self.teacher is None:
            task = self.loss(net(batch["input"]), batch)
            return task, task, {}
        output, features = net(batch["input"])
        task = self.loss(output, batch)
        _, teacher_features = self.teacher(batch["input"])
        terms = self.distill.terms(features, teacher_features)
        total = task + sum(self.distill.weights[n] * t for n, t in terms.items())
        return total, task, terms


def _train_epoch(net: nn.Module, objective: _Objective, optimizer: torch.optim.Optimizer, loader: DataLoader,
                 ctx: dd.Context, epoch: int, recipe: Recipe, progress: bool) -> dict[str, float]:
    net.train()
    layers = list(objective.distill.weights) if objective.distill else []
    sums = np.zeros(3 + len(layers))  # samples, total, task, per-layer terms
    description = f"epoch {epoch}/{recipe.epochs}"
    for step, batch in enumerate(progress_bar(loader, description, enabled=progress and ctx.is_main), 1):
        batch = _to(batch, ctx.device)
        total, task, terms = objective(net, batch)
        if not torch.isfinite(total):
            raise RuntimeError(f"the training loss is {float(total)} at epoch {epoch}, step {step}; "
                               f"lower lr (now {recipe.lr:g}) or check the data")
        optimizer.zero_grad(set_to_none=True)
        total.backward()
        optimizer.step()
        n = batch["input"].shape[0]
        values = [total, task] + [terms[name] for name in layers]
        sums += n * np.array([1.0] + [v.item() for v in values])
    sums = dd.all_reduce_sums(sums.tolist(), ctx)
    samples = max(sums[0], 1.0)
    record = {"loss": sums[1] / samples, "task_loss": sums[2] / samples}
    record["distill_loss"] = record["loss"] - record["task_loss"]
    record.update({f"distill/{name}": sums[3 + i] / samples for i, name in enumerate(layers)})
    return record


def evaluate(model: nn.Module, dataset: Dataset, metric: Metric, loss: losses.TaskLoss, ctx: dd.Context,
             batch_size: int) -> tuple[float, float]:
    """(metric, task loss) over the whole dataset: each rank scores its shard, sums are reduced."""
    was_training = model.training
    model.eval()
    loader = DataLoader(Subset(dataset, dd.shard(len(dataset), ctx)), batch_size=batch_size, collate_fn=collate)
    value_sum, count, loss_sum, samples = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for batch in loader:
            batch = _to(batch, ctx.device)
            output = model(batch["input"])
            s, c = metric.fn(output, batch)
            n = batch["input"].shape[0]
            value_sum, count = value_sum + s, count + c
            loss_sum, samples = loss_sum + float(loss(output, batch)) * n, samples + n
    model.train(was_training)
    value_sum, count, loss_sum, samples = dd.all_reduce_sums([value_sum, count, loss_sum, samples], ctx)
    return value_sum / max(count, 1), loss_sum / max(samples, 1)


def _better(value: float, best: Optional[float], metric: Metric) -> bool:
    if best is None:
        return True
    return value > best if metric.higher_is_better else value < best


def _csv(history: list[dict[str, Any]]) -> str:
    columns: list[str] = []
    for record in history:
        columns += [k for k in record if k not in columns]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for record in history:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in record.items()})
    return out.getvalue()


def _write_epoch(recipe: Recipe, models: Models, optimizer: torch.optim.Optimizer, history: list[dict[str, Any]],
                 best: tuple[Optional[float], Optional[int]], is_best: bool, teacher_qparams: Optional[dict]) -> None:
    """Publish last.pt (+ best.pt), state.pt, metrics.csv and metrics.json together, atomically."""
    epoch = history[-1]["epoch"]
    meta = {"epoch": epoch, "metric": recipe.metric, "value": history[-1][recipe.metric],
            "recipe": recipe.source, "best_epoch": best[1]}

    def save_checkpoint(tmp: str) -> None:
        ck.save(tmp, models.student, factory=recipe.model.factory, factory_kwargs=dict(recipe.model.kwargs),
                inputs=models.inputs, meta=meta)

    state = {"format": STATE_FORMAT, "version": STATE_VERSION, "epoch": epoch, "best_value": best[0],
             "best_epoch": best[1], "history": history, "optimizer": optimizer.state_dict(),
             "model": {k: v.detach().cpu() for k, v in models.student.state_dict().items()},
             "teacher_qparams": teacher_qparams}
    summary = {"recipe": recipe.source, "metric": recipe.metric, "higher_is_better": METRICS.get(recipe.metric).higher_is_better,
               "best": {"epoch": best[1], "value": best[0]}, "epochs": history}
    out_dir = recipe.output_dir
    with AtomicOutputs() as out:
        out.write(out_dir / "last.pt", save_checkpoint)
        if is_best:
            out.write(out_dir / "best.pt", save_checkpoint)
        out.write(out_dir / STATE_FILE, lambda tmp: torch.save(state, tmp))
        out.write_text(out_dir / "metrics.csv", _csv(history))
        out.write_text(out_dir / "metrics.json", json_text(summary, indent=2))


def _restore(state: dict[str, Any], models: Models, optimizer_factory: Callable[[], torch.optim.Optimizer],
             recipe: Recipe) -> torch.optim.Optimizer:
    path = recipe.output_dir / STATE_FILE
    try:
        models.student.load_state_dict(state["model"])
    except RuntimeError as err:
        raise RecipeError(f"{path} does not fit this recipe's model: {str(err).splitlines()[0]}") from None
    set_mode(models.student, "quantize")
    if models.teacher is not None and recipe.distill.quant_teacher:
        if not state.get("teacher_qparams"):
            raise RecipeError(f"{path} has no teacher qparams, but the recipe sets quant_teacher")
        _quantize_teacher(models.teacher, qp.load(state["teacher_qparams"]))
    optimizer = optimizer_factory()
    try:
        optimizer.load_state_dict(state["optimizer"])
    except (ValueError, KeyError) as err:
        raise RecipeError(f"{path}: the optimizer state does not fit this recipe ({err})") from None
    return optimizer


def _quantize_teacher(teacher: dst.Teacher, records: dict[str, qp.QuantPoint]) -> None:
    load_qparams(teacher.model, records)
    set_mode(teacher.model, "quantize")


def train(recipe: str | Path | Mapping[str, Any] | Recipe, *, resume: bool = False, epochs: Optional[int] = None,
          progress: bool = True, log: Optional[Callable[[str], None]] = None, seed: Optional[int] = None,
          output_dir: Optional[str | Path] = None) -> TrainResult:
    """Run a recipe (see the module docstring): QAT from the float weights with distillation.

    Works alone or under ``torchrun`` (one process per device; DDP). `resume` continues the run
    in the recipe's output_dir (model, optimizer, epoch, best metric); `epochs`, `seed` and
    `output_dir` override the recipe's (one recipe, several seeds). `log` receives one line per
    event on rank 0.
    """
    recipe = load_recipe(recipe, epochs=epochs)
    if seed is not None:
        recipe = dataclasses.replace(recipe, seed=int(seed))
    if output_dir is not None:
        recipe = dataclasses.replace(recipe, output_dir=Path(output_dir))
    ctx = dd.init()
    say = log if (log is not None and ctx.is_main) else (lambda line: None)
    try:
        return _run(recipe, resume, progress, ctx, say)
    finally:
        dd.shutdown(ctx)


def _run(recipe: Recipe, resume: bool, progress: bool, ctx: dd.Context, say: Callable[[str], None]) -> TrainResult:
    torch.manual_seed(recipe.seed)
    torch.set_flush_denormal(True)  # Adam's tiny second moments turn denormal: ~16x slower on CPUs
    use_compiled_kernels(recipe.compile)
    for note in recipe.notes:
        say(note)
    state = _output_state(recipe, resume)
    loss = losses.task_loss(recipe.loss)
    metric = METRICS.get(recipe.metric)
    datasets = {split: build_dataset(recipe.data, split) for split in ("train", "val")}
    models = build_models(recipe, datasets, loss, metric, ctx.device)
    params = [p for p in models.student.parameters() if p.requires_grad]
    searched = weights_searched_every_step(models.student)
    if searched:
        say(f"note: {len(searched)} weight quantizers (first {searched[0]}) search their range again at every "
            "step (a fixed quantizer with a searching observer, e.g. 4-bit weights' default mse): slow; "
            "`quantizer: lsq` learns the scale instead, `observer: minmax` takes min/max")

    def make_optimizer() -> torch.optim.Optimizer:
        return _optimizer(recipe, params)

    teacher_qparams = None
    if state is None:
        per_rank = math.ceil(recipe.calibration_batches / ctx.world_size)
        seen = calibrate(models.student, _train_loader(datasets["train"], recipe, ctx, 0), max_batches=per_rank,
                         device=ctx.device, progress=progress and ctx.is_main, reduce=dd.all_reduce_observers)
        say(f"calibrated on {seen} batches per rank x {ctx.world_size} rank(s) (observers merged)")
        if models.teacher is not None and recipe.distill.quant_teacher:
            records = qparams_of(models.student)
            _quantize_teacher(models.teacher, records)
        optimizer = make_optimizer()
        history: list[dict[str, Any]] = []
        best: tuple[Optional[float], Optional[int]] = (None, None)
        start = 1
    else:
        optimizer = _restore(state, models, make_optimizer, recipe)
        history, best, start = list(state["history"]), (state["best_value"], state["best_epoch"]), state["epoch"] + 1
        say(f"resuming {recipe.output_dir} after epoch {state['epoch']} (best {recipe.metric} {best[0]})")
    if models.teacher is not None and recipe.distill.quant_teacher:
        teacher_qparams = qp.dump(qparams_of(models.teacher.model).values())
    net: nn.Module = models.student_net
    if ctx.distributed:
        device_ids = [ctx.device] if ctx.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(models.student_net, device_ids=device_ids)
    objective = _Objective(loss, dst.DistillationLoss(recipe.distill.weights) if recipe.distill else None,
                           models.teacher)
    for epoch in range(start, recipe.epochs + 1):
        t0 = perf_counter()
        if recipe.freeze_bn_epoch is not None and epoch >= recipe.freeze_bn_epoch:
            freeze_bn_stats(models.student)
        loader = _train_loader(datasets["train"], recipe, ctx, epoch)
        record = {"epoch": epoch, **_train_epoch(net, objective, optimizer, loader, ctx, epoch, recipe, progress)}
        dd.broadcast_buffers(models.student, ctx)
        value, val_loss = evaluate(models.student, datasets["val"], metric, loss, ctx, recipe.batch_size)
        record.update({"val_loss": val_loss, recipe.metric: value})
        is_best = _better(value, best[0], metric)
        if is_best:
            best = (value, epoch)
        record.update({"best": is_best, "lr": optimizer.param_groups[0]["lr"], "seconds": perf_counter() - t0})
        history.append(record)
        if ctx.is_main:
            _write_epoch(recipe, models, optimizer, history, best, is_best, teacher_qparams)
        say(f"epoch {epoch}/{recipe.epochs}  loss {record['loss']:.4g} (task {record['task_loss']:.4g}, "
            f"distill {record['distill_loss']:.4g})  val {recipe.metric} {value:.4g}{metric.unit}"
            f"{'  best' if is_best else ''}  {record['seconds']:.1f} s")
        dd.barrier(ctx)
    return TrainResult(models.student, history, best[0], best[1], recipe.output_dir, ctx.is_main, recipe.notes)
