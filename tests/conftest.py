"""Shared fixtures: deterministic seeds and small models from deployq.examples.zoo; the repository's
benchmarks/ package made importable (tests run parts of it)."""

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def import_benchmarks() -> None:
    """Import the repository's benchmarks/ package by its path: putting the repository root on
    sys.path would also make calib/ and exporters/ importable as top-level modules. The wheel's
    test run (scripts/test-wheel.sh) copies tests/ without benchmarks/ and runs no test that needs
    it."""
    folder = ROOT / "benchmarks"
    if "benchmarks" not in sys.modules and (folder / "__init__.py").exists():
        spec = importlib.util.spec_from_file_location("benchmarks", folder / "__init__.py",
                                                      submodule_search_locations=[str(folder)])
        sys.modules["benchmarks"] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)


import_benchmarks()

# One thread per test process: the suite runs on 2 workers (pytest -n 2), and on tiny tensors a
# second OpenMP thread competing for a busy core made single convolutions ~70x slower.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


@pytest.fixture
def rng():
    return np.random.default_rng(0)



@pytest.fixture(autouse=True)
def _eager_quantizer_kernels_after_each_test():
    """`deployq train` turns the quantizers' fused kernels on (the C kernels on the CPU, what users
    run); each test starts from the eager ones again, whatever the test before it trained."""
    from deployq.qat import fake_quant

    yield
    fake_quant.use_compiled_kernels(False)
