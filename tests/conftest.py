import os
import sys

import pytest
import torch

# The tests run the project from the checkout (no install needed for them to import it).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Test tensors are tiny: one intra-op thread avoids OpenMP spin-waits, which cost 100x when cores are busy.
torch.set_num_threads(1)

# The `maths` subset (python -m pytest -m maths): the propositions of the papers, the exact toys and the checkpoint
# loader's refusals. Every test in these files is fast; the end-to-end runs of train.py and the networks are not here.
MATHS_FILES = {"test_addim.py", "test_analytic_precond.py", "test_cd.py", "test_checkpoint.py",
               "test_checkpoint_security.py", "test_ctm.py", "test_distillation.py", "test_edm.py", "test_ema.py",
               "test_jumpers.py", "test_loss_draws.py", "test_mcm.py", "test_samplers.py", "test_toy.py",
               "test_toy_datasets.py", "test_weightings.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in MATHS_FILES:
            item.add_marker(pytest.mark.maths)

def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long end-to-end run (CI runs it as well)")
