"""The flow: the list of steps run as a cycle, and where in the cycle the run is.

``[Step(d, ..., repeat=3), Step(g, ...)]`` is the cycle D, D, D, G, D, D, D, G, ... By default
the position in the cycle persists across epoch boundaries: an epoch that ends after the second
D update is followed by an epoch that starts with the third. ``Flow(steps, restart="epoch")``
starts the cycle afresh at every epoch, as a loop written ``if i % n_critic == 0`` over the
batch index ``i`` of each epoch does.

:class:`Handoff` carries a value from one step's loss to a later step's loss in the same cycle
(pytorch/examples' DCGAN scores D's ``fake`` again in the G step), and says so when the value
it would give is stale.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from trainflow.step import Step

__all__ = ["RESTARTS", "Flow", "Handoff"]

#: when the cycle goes back to its first step: never (it carries across epochs), or at each epoch start
RESTARTS = ("never", "epoch")


class Flow:
    """Steps as a cycle of updates, with the current position as state.

    ``Trainer(models, Flow(steps, restart=...))`` takes a Flow wherever it takes a list of steps.

    Args:
        steps: a :class:`~trainflow.Step` or a non-empty list of them, run in order as a cycle
            (each ``repeat`` times).
        restart: ``"never"`` (default): the position carries across epochs. ``"epoch"``: every
            epoch starts at the first step, as PyTorch-GAN's WGAN-GP loop does (G updates when
            ``i % n_critic == 0``, ``i`` the batch index in the epoch): with 9 batches and
            ``n_critic = 5`` each epoch is D G D D D D D G D D, whatever the last one ended on.

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
        >>> restarting = Flow(flow.steps, restart="epoch")
        >>> restarting.advance(); restarting.current.name
        'D'
        >>> restarting.advance(); restarting.advance(); restarting.current.name
        'G'
        >>> restarting.start_epoch(); restarting.current.name  # a new epoch: the first step again
        'D'
    """

    def __init__(self, steps: Step | Sequence[Step], *, restart: str = "never") -> None:
        if restart not in RESTARTS:
            raise ValueError(
                f"Flow: `restart` must be 'never' or 'epoch'. Received: restart={restart!r}. Pass restart='epoch' "
                "to start the cycle at its first step every epoch, or restart='never' to carry it across epochs."
            )
        self.restart = restart
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
            if step.batch == "same" and not set(step.streams) <= set(prev.streams):
                raise ValueError(
                    f"Trainer: step {step.name!r} has batch='same' and data={step.data!r}, but the step "
                    f"before it draws from data={prev.data!r}. A reused batch comes from the previous "
                    f"update: draw from (some of) the same streams, or use batch='next'."
                )
        self.cycle: tuple[Step, ...] = tuple(s for s in self.steps for _ in range(s.repeat))
        self.position = 0

    def _name_steps(self) -> None:
        """A step without a name is named ``step<i>`` by its place, on a copy: the user's Step
        is not renamed, so the same Step in another flow is named by its place there."""
        steps = list(self.steps)
        seen: dict[str, int] = {}
        places: dict[int, int] = {}
        for i, step in enumerate(steps):
            if id(step) in places:
                raise ValueError(
                    f"Trainer: steps {places[id(step)]} and {i} are the same Step object. Received: "
                    f"{step!r} twice. For more updates of it per cycle use Step(..., repeat=n); for two "
                    "kinds of update build two Steps, each with its own name=."
                )
            places[id(step)] = i
            if step.name is None:
                step = steps[i] = copy.copy(step)
                step.name = f"step{i}"
            if step.name in seen:
                raise ValueError(
                    f"Trainer: steps {seen[step.name]} and {i} are both named {step.name!r}. "
                    "Step names key logs and checkpoints: give each step its own name=."
                )
            seen[step.name] = i
        self.steps = tuple(steps)

    @property
    def current(self) -> Step:
        """The step whose update comes next."""
        return self.cycle[self.position]

    def advance(self) -> None:
        """Move to the next update of the cycle."""
        self.position = (self.position + 1) % len(self.cycle)

    def start_epoch(self) -> None:
        """Called by the trainer when an epoch starts: with ``restart="epoch"``, back to the first step."""
        if self.restart == "epoch":
            self.position = 0

    def state_dict(self) -> dict[str, Any]:
        """The position in the cycle, the cycle's step names and the restart rule."""
        return {"position": self.position, "cycle": [s.name for s in self.cycle], "restart": self.restart}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the position; a state of another cycle (or restart rule) is refused."""
        cycle = [s.name for s in self.cycle]
        if state["cycle"] != cycle:
            raise ValueError(
                f"Flow state is for the cycle {state['cycle']}, but this flow's cycle is {cycle}. "
                "Load a state saved by the same flow (same steps, names and repeats)."
            )
        if state.get("restart", self.restart) != self.restart:
            raise ValueError(
                f"Flow state was saved with restart={state['restart']!r}, but this flow has restart={self.restart!r}: "
                "the run would continue another schedule of updates. Build the flow as the saved run did."
            )
        self.position = int(state["position"])


class Handoff:
    """A value that one step's loss hands to a later step's loss within one cycle.

    pytorch/examples' DCGAN draws ``fake = netG(noise)`` in the D step and scores the same
    ``fake`` (and its graph into G) again in the G step. A closure over a local variable does
    that exactly, but nothing would notice a value left over from an earlier cycle; a Handoff
    does: ``put(value)`` in the giving step, ``take()`` in the receiving one. ``take()``
    raises when nothing was put since the previous ``take()`` (a stale value: the giving step
    did not run in this cycle, e.g. the flow was reordered, or the run was resumed from a
    checkpoint taken between the two steps: a tensor's graph is not saved in a checkpoint).
    The latest ``put`` wins (WGAN-GP's critic draws noise at each of its updates; G reuses
    the last one's).

    Args:
        name: what the value is, for the error messages (e.g. ``"fake"``).

    Example:
        >>> import torch
        >>> from trainflow.flow import Handoff
        >>> fake = Handoff("fake")
        >>> fake.put(torch.ones(2))
        >>> fake.take()
        tensor([1., 1.])
        >>> fake.take()
        Traceback (most recent call last):
        ...
        ValueError: Handoff 'fake': take() found no value put since the previous take(): it would be stale, from an earlier cycle. Received: 1 put(s), 2 take(s). Call put() in a step that runs before this one in every cycle (the first step of a Flow), or compute the value in this step.
    """

    __slots__ = ("name", "_value", "_fresh", "_puts", "_takes")

    def __init__(self, name: str = "value") -> None:
        if not isinstance(name, str) or not name:
            raise TypeError(f"Handoff: `name` must be a non-empty string. Received: name={name!r}. Pass e.g. 'fake'.")
        self.name = name
        self._value: Any = None
        self._fresh = False
        self._puts = 0
        self._takes = 0

    def put(self, value: Any) -> None:
        """Hand ``value`` to the next :meth:`take` (replacing one not taken yet)."""
        self._value, self._fresh = value, True
        self._puts += 1

    def take(self) -> Any:
        """The value put since the previous take; a ValueError when there is none."""
        self._takes += 1
        if not self._fresh:
            raise ValueError(
                f"Handoff {self.name!r}: take() found no value put since the previous take(): it would be stale, "
                f"from an earlier cycle. Received: {self._puts} put(s), {self._takes} take(s). Call put() in a step "
                "that runs before this one in every cycle (the first step of a Flow), or compute the value in this "
                "step."
            )
        value, self._value, self._fresh = self._value, None, False  # the graph is freed once taken
        return value
