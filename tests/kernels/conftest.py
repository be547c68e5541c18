"""Kernel tests run the Triton kernels in the interpreter when there is no GPU.

TRITON_INTERPRET must be set before any @triton.jit function is defined, so
this runs before the test modules import `kernels.lora_triton`.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
