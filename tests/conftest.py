"""Test-wide settings: one intra-op thread (the tests use tiny tensors, for which thread
synchronisation costs more than it saves, and CI machines have 2 cores)."""
import torch

torch.set_num_threads(1)
