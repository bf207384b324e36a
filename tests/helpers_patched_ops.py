"""A helper module whose function a test's forward reaches as ``helpers_patched_ops.act`` (an attribute of an
imported module, not a global of the test's file): tests/test_guard_reach.py rebinds it."""
import torch

act = torch.tanh
