"""Smoke test of the benchmark harness: `benchmarks/run_all.py --quick` runs every benchmark on a
two-layer stand-in for the low-light network and writes BENCHMARKS.md with every table; missing
checkpoints stop it before anything runs, with a message naming them."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

from benchmarks import common, run_all  # the package conftest.py imports by its path
from benchmarks.models import tiny_raw_to_rgb

TINY = "benchmarks.models:tiny_raw_to_rgb"
SHAPE = (1, 4, 64, 64)  # the held-out set's packed raw at its default size (128)
TEN_BIT = {"input": 10, "layers": {"conv1": {"weight": "10 per_channel_affine", "activation": "10 per_tensor_affine"}}}

EXPECTED_TABLES = {  # section key: header cells its tables must have
    "lowlight": ["| weights | quantization | runtime | bits | PSNR (dB) |"],
    "digits": ["| quantization | runtime | test accuracy (mean ± sd) |"],
    "parity": ["| model | bits | quant points | codes compared | reference, local: equal |"],
    "speed": ["| model | int8 model | fp32 median (ms) |", "| training step | median (s) | × float |",
              "| export | median (s) | × torch.onnx.export |", "| tool | median wall time (s) | × deployq diff |",
              "| what | deployq diff | Polygraphy |"],
    "scale": ["| depth | quant points | export (s) |", "| stage | ms / layer at 1 | ms / layer at 2 |"],
    "hessian": ["| # | layer | n | iterations |"],
    "conformance": ["| model | quant points | export | check max LSB | int16 local: lowest row (dB) |"],
    "timm": ["| family | model | params (M) | input | capture | quant points | inspect | export | check |"],
    "mutants": ["| mutant | file | tests run | result | first failure | s |"],
    "suite": ["| what | measured | budget | within |", "| seconds | phase | test |"],
    "devices": ["| model | NNAPI, --device cpu | NNAPI, --device nnapi |"],
    "ptq": ["| quantization | lowlight (trained) |"],
    "latency": ["| width | packed input | threads | fp32 (ms) |", "| op type | fp32 | int8, 10-bit head/tail |",
                "| convolution | form | ms | × float Conv | exact |"],
}
EXPECTED_ROWS = {  # section key: regular expressions of rows it must have
    "lowlight": [r"\| float \| - \| torch fp32 \| fp32 \|", r"\| float, trained on as long as QAT \| - \| torch fp32 \|", r"\| QAT \+ distillation \| deployq \| ORT int8 \| act 8 \(10 at \d+\)",
                 r"\| float \| ORT quantize_static Entropy \| ORT int8 \|"],
    "digits": [r"\| float \(1 ep\.\) \| torch fp32 \| \d", r"\| deployq QAT \+ distillation \(1 ep\.\) \| ORT int8 \| \d",
               r"\| ORT quantize_static Percentile \| ORT int8 \|", r"\| torch\.ao FX QAT"],
    "parity": [r"\| plain_cnn \| 8 \| 10 \| \d+ \| [\d.]+% \| [01] \|", r"\| low-light \(qat\.pt\) \| 8/10 \|"],
    "speed": [r"\| deployq QAT \| [\d.]+ \| [\d.]+× \|", r"\| Polygraphy \(2 runs\) \| [\d.]+ \|",
              r"\| fake quantizers \(their autograd nodes, C kernels inside\) \| \d+ \| \d+ \|",
              r"\| torch.compile \(guards and compiled kernels\) \| \d+ \| \d+ \|"],
    "ptq": [r"\| quantize_static Entropy \| -?[\d.]+, \d+ s \|", r"\| \+ adaround \| -?[\d.]+, \d+ s \|",
            r"\| only the input quantized \(ceiling, torch\) \| -?[\d.]+ \|"],
    "scale": [r"\| 1 \| 3 \| [\d.]+ \|", r"\| diff kernel \|"],
    "hessian": [r"\| 1 \| `"],
    "latency": [r"\| 8 \| 32×32 \| 1 \| \d+ \| [\d.]+× \| [\d.]+× \| [\d.]+× \| [\d.]+× \|",
                r"\| exact 10-bit x 8-bit: 2 ConvInteger \+ int32 combine \| [\d.]+ \| [\d.]+× \| yes \|"],
    "devices": [r"\| zoo UNet \(ConvTranspose\) \| \d+/\d+ \([\d.]+%\), 1 \| (\d+)/\1 \(100\.0%\), 1 \|"],
    "conformance": [r"\| squeezenet1_1 \| \d+ \| yes \| [01] \| [\d.]+ \|"],
    "timm": [r"\| resnet \| test_resnet \| [\d.]+ \| 64 \| fx \| \d+ \| ✓ \| ✓ \| ✓ \| ✓ \|"],
    "mutants": [r"\| formula: multiply by 1/s \| `deployq/core/qformula.py` \| `test_qformula.py` \| caught \|"],
    "suite": [r"\| wall time \| [\d.]+ min \| 15 min \|", r"\| peak memory of a worker \| [\d.]+ GiB"],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> common.LowlightCheckpoints:
    """A float state_dict and two calibrated checkpoints (10-bit head, all 8-bit) of the stand-in."""
    folder = tmp_path_factory.mktemp("lowlight")
    torch.save(tiny_raw_to_rgb().state_dict(), folder / "float.pt")
    gen = torch.Generator().manual_seed(0)
    batches = [torch.rand((1, 4, 16, 16), generator=gen) for _ in range(2)]
    qat = common.calibrated_checkpoint(folder / "qat.pt", TINY, {}, SHAPE, batches, config=TEN_BIT)
    all8 = common.calibrated_checkpoint(folder / "qat_all8.pt", TINY, {}, SHAPE, batches)
    return common.LowlightCheckpoints(folder / "float.pt", folder / "float.pt", qat, qat, all8, TINY)


def lowlight_args(ckpts: common.LowlightCheckpoints) -> list[str]:
    return ["--float", str(ckpts.float), "--float-control", str(ckpts.float_control), "--qat", str(ckpts.qat),
            "--qat-nodistill", str(ckpts.qat_nodistill),
            "--qat-all8", str(ckpts.qat_all8), "--factory", TINY]


# two groups of about equal time, so that `pytest -n 2` runs them side by side; the first shares
# the low-light exports between its benchmarks, as the full run does
GROUPS = ["lowlight,speed,latency,timm,mutants", "digits,scale,hessian,parity,devices,ptq,suite"]


@pytest.mark.parametrize("only", GROUPS)
def test_run_all_quick_writes_the_tables(checkpoints, tmp_path, only):
    out, results = tmp_path / "BENCHMARKS.md", tmp_path / "results"
    argv = ["--quick", "--only", only, *lowlight_args(checkpoints), "--out", str(out), "--results", str(results)]
    assert run_all.main(argv) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks")
    for fact in ("- machine: ", "- versions: python ", "torch ", "onnxruntime ", "polygraphy ", "scikit-learn ",
                 "- command: `python benchmarks/run_all.py --quick", "- date: "):
        assert fact in text, fact
    for key in only.split(","):
        section = (results / f"{key}.md").read_text()
        assert section in text
        assert re.search(r"^Reproduce: `python benchmarks/bench_\w+\.py.*`$", section, re.M), key
        for header in EXPECTED_TABLES[key]:
            assert header in section, (key, header)
        for row in EXPECTED_ROWS[key]:
            assert re.search(row, section), (key, row)


def test_missing_checkpoints_fail_before_anything_runs(tmp_path, capsys):
    argv = ["--quick", "--qat", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "B.md")]
    assert run_all.main(argv) == 2
    error = capsys.readouterr().err
    assert "--qat " + str(tmp_path / "nope.pt") in error and "never trains them" in error
    assert not (tmp_path / "B.md").exists()


def test_merge_places_a_rerun_section_among_the_kept_ones(tmp_path, capsys):
    """--merge rewrites BENCHMARKS.md from the sections it ran and every other section's last
    record in results/, naming the run each one comes from; a missing record is an error before
    anything runs."""
    results, out = tmp_path / "results", tmp_path / "BENCHMARKS.md"
    results.mkdir()
    old_run = {"date": "2026-01-02T03:04:05", "command": "python benchmarks/run_all.py", "machine": "an old CPU"}
    for key in run_all.BENCHMARKS:
        if key != "digits":
            section = common.Section(key, f"Kept {key}", f"python benchmarks/bench_{key}.py", [f"kept body of {key}"])
            (results / f"{key}.json").write_text(json.dumps(common.section_record(section, 12.0, old_run)))
    missing = results / "scale.json"
    saved = missing.read_text()
    missing.unlink()
    assert run_all.main(["--quick", "--only", "digits", "--merge", "--out", str(out), "--results", str(results)]) == 2
    assert "scale.json" in capsys.readouterr().err and not out.exists()
    missing.write_text(saved)

    assert run_all.main(["--quick", "--only", "digits", "--merge", "--out", str(out), "--results", str(results)]) == 0
    text = out.read_text()
    assert (results / "digits.md").read_text() in text
    assert "kept body of ptq" in text and "kept body of conformance" in text
    assert "from the run of 2026-01-02T03:04:05 (`python benchmarks/run_all.py`; an old CPU), kept by `--merge`" in text
    assert re.search(r"\| \[Kept ptq\]\(#kept-ptq\) \| `python benchmarks/bench_ptq.py` \| 2026-01-02T03:04 \| 12 \|", text)
    fresh = json.loads((results / "digits.json").read_text())
    assert fresh["run"]["date"] != old_run["date"] and fresh["lines"]
    assert text.index("## Kept lowlight") < text.index("## Accuracy: CNN on scikit-learn digits")  # run_all's order


def test_ptq_merge_reads_back_the_columns_it_keeps(tmp_path):
    """bench_ptq --merge keeps other models' columns from an earlier record: the table read back
    from a record renders to the same lines, failures and empty cells included."""
    from benchmarks import bench_ptq

    results = {"digits CNN (trained)": {"quantize_static MinMax": (34.681, 1.0, 0.2), "+ bias": (36.34, 0.994, 3.4),
                                        "only the input quantized (ceiling, torch)": (53.61, None, math.nan)},
               "lowlight (trained)": {"quantize_static MinMax": (29.09, None, 1.2),
                                      "--calib zeroq (no data)": (math.nan, None, math.nan, "ZeroQError: no BatchNorm")}}
    args = bench_ptq.parse_args([])
    lines = bench_ptq.body(results, args)
    run = {"date": "2026-01-02T03:04:05", "command": "python benchmarks/bench_ptq.py", "machine": "a CPU"}
    section = common.Section("ptq", "PTQ", "python benchmarks/bench_ptq.py", lines)
    (tmp_path / "ptq.json").write_text(json.dumps(common.section_record(section, 1.0, run)))
    columns, run_of = bench_ptq.kept_columns(tmp_path / "ptq.json")
    assert run_of == run and list(columns) == list(results)
    table = [line for line in lines if line.startswith("| ")]
    assert [line for line in bench_ptq.body(columns, args) if line.startswith("| ")] == table
    assert columns["lowlight (trained)"]["--calib zeroq (no data)"][3] == "ZeroQError: no BatchNorm"
    with pytest.raises(common.BenchmarkError, match="PTQ table cell"):
        bench_ptq.parse_cell("about 30 dB")
