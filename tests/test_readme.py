"""The README's Python example runs as written, and its checkpoint exports."""

import re
from pathlib import Path

from click.testing import CliRunner

from deployq.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_example_trains_exports_diffs_and_checks(tmp_path, monkeypatch, capsys):
    block = re.search(r"## The Python API in fourteen lines\n\n```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert len([line for line in block.splitlines() if line.strip()]) <= 14
    assert "deployq.export(" in block and "deployq.diff(" in block
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert (tmp_path / "build" / "model.int8.onnx").is_file()
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("accumulated; output SQNR") and printed[1].startswith("PASS: ")
    # the checkpoint route the README names next
    scope["deployq"].save_checkpoint("qat.pt", scope["qmodel"], factory="deployq.examples.zoo:unet",
                                     inputs=[scope["deployq"].InputSpec("x", (1, 3, 64, 64))])
    result = CliRunner().invoke(main, ["export", "--ckpt", "qat.pt", "--out", "build2"])
    assert result.exit_code == 0, result.output
