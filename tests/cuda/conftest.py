"""Searches on a CUDA device: collected only where torch sees one.

Without a GPU this folder collects nothing (rather than skipping), so a run on a CPU-only machine
never counts these tests as passed; each test prints the device it ran on."""
import sys
from pathlib import Path

import torch

collect_ignore_glob = [] if torch.cuda.is_available() else ["test_*.py"]
# The shared helpers (tests/_util.py), also when this folder is run on its own.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
