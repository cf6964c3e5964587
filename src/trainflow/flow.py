"""The flow: the list of steps run as a cycle, and where in the cycle the run is.

``[Step(d, ..., repeat=3), Step(g, ...)]`` is the cycle D, D, D, G, D, D, D, G, ... The
position in the cycle persists across epoch boundaries: an epoch that ends after the second D
update is followed by an epoch that starts with the third.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from trainflow.step import Step

__all__ = ["Flow"]


class Flow:
    """Steps as a cycle of updates, with the current position as state.

    Example:
        >>> import torch
        >>> from trainflow import Step
        >>> from trainflow.flow import Flow
        >>> opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        >>> flow = Flow([Step(lambda b: b, opt, name="D", repeat=3), Step(lambda b: b, opt, name="G")])
        >>> names = []
        >>> for _ in range(6):
        ...     names.append(flow.current.name)
        ...     flow.advance()
        >>> names
        ['D', 'D', 'D', 'G', 'D', 'D']
    """

    def __init__(self, steps: Step | Sequence[Step]) -> None:
        if isinstance(steps, Step):
            steps = [steps]
        if not isinstance(steps, (list, tuple)) or not steps:
            raise TypeError(
                "Trainer: `steps` must be a Step or a non-empty list of Steps. "
                f"Received: steps={steps!r}. Pass e.g. steps=[Step(loss, optimizer)]."
            )
        for i, step in enumerate(steps):
            if not isinstance(step, Step):
                raise TypeError(
                    f"Trainer: `steps[{i}]` must be a trainflow.Step. "
                    f"Received: steps[{i}] of type {type(step).__name__}. "
                    "Wrap the loss and optimizer: Step(loss, optimizer)."
                )
        self.steps: tuple[Step, ...] = tuple(steps)
        self._name_steps()
        first = self.steps[0]
        if first.batch == "same":
            raise ValueError(
                f"Trainer: the first step {first.name!r} has batch='same', but no update comes before it "
                "to take a batch from. Use batch='next' on the first step."
            )
        for prev, step in zip(self.steps, self.steps[1:]):
            if step.batch == "same" and step.data != prev.data:
                raise ValueError(
                    f"Trainer: step {step.name!r} has batch='same' and data={step.data!r}, but the step "
                    f"before it draws from data={prev.data!r}. A reused batch comes from the previous "
                    f"update: give both the same `data`, or use batch='next'."
                )
        self.cycle: tuple[Step, ...] = tuple(s for s in self.steps for _ in range(s.repeat))
        self.position = 0

    def _name_steps(self) -> None:
        seen: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            if step.name is None:
                step.name = f"step{i}"
            if step.name in seen:
                raise ValueError(
                    f"Trainer: steps {seen[step.name]} and {i} are both named {step.name!r}. "
                    "Step names key logs and checkpoints: give each step its own name=."
                )
            seen[step.name] = i

    @property
    def current(self) -> Step:
        """The step whose update comes next."""
        return self.cycle[self.position]

    def advance(self) -> None:
        """Move to the next update of the cycle."""
        self.position = (self.position + 1) % len(self.cycle)

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "cycle": [s.name for s in self.cycle]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        cycle = [s.name for s in self.cycle]
        if state["cycle"] != cycle:
            raise ValueError(
                f"Flow state is for the cycle {state['cycle']}, but this flow's cycle is {cycle}. "
                "Load a state saved by the same flow (same steps, names and repeats)."
            )
        self.position = int(state["position"])
