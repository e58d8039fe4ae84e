"""Shared fixtures: deterministic seeds and small models from deployq.examples.zoo."""

import numpy as np
import pytest
import torch

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

