import os
import sys

import torch

# The tests run the project from the checkout (no install needed for them to import it).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Test tensors are tiny: one intra-op thread avoids OpenMP spin-waits, which cost 100x when cores are busy.
torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a long end-to-end run (CI runs it as well)")
