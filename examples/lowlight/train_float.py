"""Train the float low-light network on synthetic SID-style pairs (the step before QAT).

Loss as in the paper (:mod:`.loss`): L1 on the sRGB output + L1 on the DBF's mono output. Adam
with a cosine learning-rate schedule and gradient-norm clipping at 1; with ``--ema D`` the weights
validated and saved are an exponential moving average of the trained ones (decay D per step,
``torch.optim.swa_utils``), which evens out the step-to-step swings of a small batch. The
validation split picks the checkpoint, the test split is measured on it once and written beside
the weights. examples/lowlight/README.md has the commands that made the shipped checkpoint.

Writes ``float.pt`` (a plain state_dict, loaded with weights_only=True) and ``float.json``.
``--init float.pt --name NAME`` continues training from those weights instead (the control run
that gets as many extra steps as QAT does).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from deployq.examples.lowlight.data import SyntheticLowLight
from deployq.examples.lowlight.evaluate import evaluate, test_set, torch_predictor, validation_set
from deployq.examples.lowlight.loss import lowlight_loss
from deployq.examples.lowlight.model import build
from deployq.core.files import AtomicOutputs
from deployq.core.progress import progress_bar


def train(steps: int, size: int, batch: int, width: int, lr: float, seed: int, out: Path, threads: int,
          init: Path | None = None, name: str = "float", val_every: int = 1000, ema: float | None = None) -> dict:
    """Train, validate every `val_every` steps, keep the weights with the best validation PSNR;
    the test split is measured once, on those weights, at the end."""
    torch.manual_seed(seed)
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # Adam's tiny second moments turn denormal: 16x slower on CPUs
    model = build(width=width, seed=seed)
    if init is not None:
        model.load_state_dict(torch.load(init, weights_only=True))
    data = SyntheticLowLight(size=size, length=steps * batch, split="train", seed=seed)
    loader = torch.utils.data.DataLoader(data, batch_size=batch, shuffle=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.02 + 0.98 * 0.5 * (1 + math.cos(math.pi * s / steps)))
    averaged = None if ema is None else AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(ema))
    kept = model if averaged is None else averaged.module  # the weights validated and saved
    val = validation_set()
    log, best = [], {"psnr": -math.inf, "step": None, "state": None}
    start = time.perf_counter()
    model.train()
    for step, items in enumerate(progress_bar(loader, "float training", total=steps)):
        loss = lowlight_loss(model(items["input"]), items)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if averaged is not None:
            averaged.update_parameters(model)
        if step % 100 == 0 or step == steps - 1:
            log.append({"step": step, "loss": loss.item(), "seconds": time.perf_counter() - start})
        if (step + 1) % val_every == 0 or step == steps - 1:
            psnr = evaluate(torch_predictor(kept), val)["psnr"]
            model.train()
            log[-1]["val_psnr"] = psnr
            print(f"step {step + 1:6d}  loss {loss.item():.4f}  val {psnr:.2f} dB  {time.perf_counter() - start:.0f} s", flush=True)
            if psnr > best["psnr"]:
                best = {"psnr": psnr, "step": step + 1, "state": copy.deepcopy(kept.state_dict())}
                with AtomicOutputs() as files:  # the best so far, readable while training goes on
                    files.write(out / f"{name}.best-so-far.pt", lambda tmp: torch.save(best["state"], tmp))
    model.load_state_dict(best["state"])
    command = (f"python -m deployq.examples.lowlight.train_float --steps {steps} --size {size} --batch {batch} "
               f"--width {width} --lr {lr} --seed {seed} --threads {threads} --val-every {val_every}")
    if ema is not None:
        command += f" --ema {ema}"
    if init is not None:
        command += f" --init {init} --name {name}"
    report = {"command": command, "width": width, "steps": steps, "best_step": best["step"],
              "train_seconds": time.perf_counter() - start, "photographs": data.names,
              "val": evaluate(torch_predictor(model), val), "test": evaluate(torch_predictor(model), test_set()),
              "log": log}
    with AtomicOutputs() as files:
        files.write(out / f"{name}.pt", lambda tmp: torch.save(model.state_dict(), tmp))
        files.write_text(out / f"{name}.json", json.dumps(report, indent=1) + "\n")
    (out / f"{name}.best-so-far.pt").unlink(missing_ok=True)
    return report


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--size", type=int, default=64, help="training crop size in raw pixels (even)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--width", type=int, default=8)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("examples/lowlight/checkpoints"))
    parser.add_argument("--init", type=Path, help="continue from these float weights (a state_dict)")
    parser.add_argument("--name", default="float", help="output files: NAME.pt and NAME.json")
    parser.add_argument("--val-every", type=int, default=1000, help="steps between validations (checkpoint choice)")
    parser.add_argument("--ema", type=float, help="validate and save an exponential moving average of the weights "
                                                  "with this decay per step (e.g. 0.999)")
    args = parser.parse_args(argv)
    if args.ema is not None and not 0.0 < args.ema < 1.0:
        parser.error(f"--ema must be a decay between 0 and 1, got {args.ema}")
    report = train(args.steps, args.size, args.batch, args.width, args.lr, args.seed, args.out, args.threads,
                   args.init, args.name, args.val_every, args.ema)
    print(json.dumps({"val": report["val"], "test": report["test"]}))


if __name__ == "__main__":
    main()
