"""The ``deployq`` command line: one module per subcommand (inspect, export, diff, check, run, train,
hessian), shared options and error handling in :mod:`.common`.

    deployq inspect  --model deployq.examples.zoo:unet --input-shape 1,3,64,64 [--config q.yaml]
    deployq export   --ckpt qat.pt --target int8 --out build/
    deployq diff     build/model.float.onnx build/model.int8.onnx
"""

from __future__ import annotations

import sys

import click

from deployq._version import __version__
from deployq.cli.check import check
from deployq.cli.diff import diff
from deployq.cli.export import export
from deployq.cli.hessian import hessian
from deployq.cli.inspect import inspect
from deployq.cli.run import run_command
from deployq.cli.train import train


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="deployq")
def main() -> None:
    """deployq: PyTorch -> QAT (+ distillation) -> integer ONNX for onnxruntime, checked layer by layer.

    \b
    Typical flow:
      deployq inspect --model pkg.mod:build --input-shape 1,3,224,224   # list quant points
      deployq hessian --ckpt qat.pt --input calib/ --yaml distill.yaml   # where to distill
      deployq train   --recipe recipe.yaml                               # QAT + distillation
      deployq export  --ckpt qat.pt --target int8 --out build/            # float + QDQ ONNX
      deployq diff    build/model.float.onnx build/model.int8.onnx       # per-layer parity
      deployq check   --ckpt qat.pt --onnx build/model.int8.onnx         # torch vs ONNX codes
    """

main.add_command(inspect)
main.add_command(export)
main.add_command(diff)
main.add_command(check)
main.add_command(run_command)
main.add_command(hessian)
main.add_command(train)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
