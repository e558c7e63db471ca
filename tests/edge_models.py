"""Small real torch models for the edge worker's tests, loadable as `tests.edge_models:FACTORY`.

`gated` holds every forward pass at a gate the test opens and closes (`GATE`), so a test can
keep a request inside the worker for as long as it needs without timing assumptions; `ENTERED`
is set when a forward pass reaches the gate.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

GATE = threading.Event()
GATE.set()
ENTERED = threading.Event()
GATE_TIMEOUT_S = 60.0


def gate(x: torch.Tensor) -> torch.Tensor:
    """`x`, once `GATE` is open (a traced leaf: it runs at inference time, not when tracing)."""
    ENTERED.set()
    if not GATE.wait(GATE_TIMEOUT_S):
        raise RuntimeError(f"gate held closed for {GATE_TIMEOUT_S} s")
    return x


torch.fx.wrap("gate")


class Gated(nn.Module):
    """gate -> Linear(8, 4): one exit."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(gate(x))


def gated() -> nn.Module:
    return Gated()


class Squares(nn.Module):
    """x·x -> Linear(8, 4): one exit. A finite input of 3e38 overflows x·x to inf, so the logits
    are never finite, whatever the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x * x)


def squares() -> nn.Module:
    return Squares()


class HeavyHead(nn.Module):
    """Linear(64, 4096) -> ReLU -> Linear(4096, 4096): one exit whose node is a few ms of compute,
    far more than a request's own cost (the request-cost measurement subtracts it)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 4096)
        self.fc2 = nn.Linear(4096, 4096)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def heavy_head() -> nn.Module:
    return HeavyHead()
