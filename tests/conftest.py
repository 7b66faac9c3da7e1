"""Shared test setup: small thread count so the suite behaves the same on 2 cores and in CI."""

import torch

torch.set_num_threads(2)
