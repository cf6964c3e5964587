"""The compiled whole update of a declarative step (``Trainer(compile=True)``).

``torch.compile`` turns the step's loss function (the models' forward passes and the loss)
into one graph, and AOTAutograd compiles its backward with it; each optimizer's ``step`` is
compiled on its own (PyTorch's compiled optimizer step: its per-parameter loops become a few
fused kernels). On CUDA the loss runs under CUDA graphs (``mode="reduce-overhead"``): one
launch replays the whole forward and backward, which is what a small model on a GPU, bound by
the host's Python and kernel launches, needs. The update around them (clearing gradients,
isolation, the non-finite decision, clipping, schedules) is the same as eager.

Where a step cannot be captured it runs eagerly, with a warning saying why:

- a custom step (``Step.custom``): its update is Python that may branch on values;
- batches whose shapes keep changing: after ``MAX_SHAPES`` distinct shapes the step stops
  compiling new graphs (each shape is a new graph, and a new CUDA graph);
- a loss or optimizer that ``torch.compile`` fails on (the error is quoted);
- the optimizer step of a step with a learning-rate schedule (a float learning rate that
  changes recompiles the step every time) or under float16 loss scaling (the scaler steps it).

Dynamo keeps its compiled graphs per code object, and every optimizer of a class steps through
the same code: each new optimizer is a recompile of that code, and after
``torch._dynamo.config.recompile_limit`` (8) of them dynamo silently runs it eagerly. So each
step compiles its functions in a region of its own (``torch.compile(isolate_recompiles=True)``,
where torch has it): one trainer's recompiles do not count against another's, and the ninth
trainer of a process (an experiment's ninth trial) compiles like the first. Where dynamo still
gives up on a function (a region's own limit, or ``accumulated_recompile_limit`` over all of
them, or an older torch), the step warns once, saying which function and how to raise the limit.

CPU eager runs stay bit-identical to a hand-written loop; a compiled update differs from eager
only by the floating-point reassociation of fused kernels (random numbers drawn inside the
compiled loss come from inductor's own generator: dropout masks differ from eager's).
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from trainflow.data.batch import first_tensor

if TYPE_CHECKING:
    from trainflow.step import Step

__all__ = ["MAX_SHAPES", "CompiledUpdate", "custom_step_warning", "region_options"]

#: distinct batch shapes a step compiles for before it runs eagerly
MAX_SHAPES = 4


#: torch.compile(isolate_recompiles=True): a compiled function's recompiles counted on their own
_ISOLATES = "isolate_recompiles" in inspect.signature(torch.compile).parameters


def region_options() -> dict[str, Any]:
    """The ``torch.compile`` options that give a compiled function a region of its own (its
    recompiles count against no other function's); none where torch does not have them.

    Example:
        >>> import inspect, torch
        >>> region_options() == ({"isolate_recompiles": True}
        ...                      if "isolate_recompiles" in inspect.signature(torch.compile).parameters else {})
        True
    """
    return {"isolate_recompiles": True} if _ISOLATES else {}


def _compile(fn: Callable[..., Any], **options: Any) -> Callable[..., Any]:
    """``torch.compile(fn)`` in a region of its own: its recompiles count against no other function's."""
    return torch.compile(fn, **options, **region_options())


class _LimitHits(logging.Handler):
    """Dynamo's "hit config.recompile_limit" warnings: after one, the function named runs eagerly.

    Dynamo reports it only in its log (``torch._dynamo.convert_frame``); this handler keeps
    the first line of each such record so that the step that was running can warn about it.
    """

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.hits: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "hit config." in message:
            lines = [line.strip() for line in message.splitlines()]
            function = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("function:")), "?")
            self.hits.append(f"{lines[0]} for {function}")


_HITS: _LimitHits | None = None


def _limit_hits() -> _LimitHits:
    global _HITS
    if _HITS is None:
        _HITS = _LimitHits()
        logging.getLogger("torch._dynamo.convert_frame").addHandler(_HITS)
    return _HITS


def _compile_errors() -> tuple[type[BaseException], ...]:
    import torch._dynamo.exc as exc  # imported when a step compiles, not with trainflow

    return (exc.TorchDynamoException,)


def custom_step_warning(step: Step) -> None:
    """Warn that ``compile=True`` leaves a custom step's update eager (its models are compiled)."""
    warnings.warn(
        f"Trainer(compile=True): step {step.name!r} is a custom step (Step.custom), whose update is Python that "
        "may branch on values, so its update runs eagerly; only the models it calls are compiled. Write it as "
        "Step(loss, optimizer) to compile its whole update.",
        UserWarning,
        stacklevel=4,
    )


class CompiledUpdate:
    """The compiled loss and optimizer steps of one declarative step.

    ``loss(batch)`` is the step's loss function compiled (eager once it falls back);
    ``step(optimizers)`` steps each optimizer through its compiled ``step``. ``cuda_graphs``
    uses ``mode="reduce-overhead"`` for the loss (the default on CUDA). ``eager_reason`` says
    why the loss runs eagerly (None while it is compiled).

    Example:
        >>> import torch
        >>> from trainflow import Step
        >>> model = torch.nn.Linear(2, 1)
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> step = Step(lambda b: model(b).pow(2).mean(), opt, name="fit")
        >>> compiled = CompiledUpdate(step, torch.device("cpu"), max_shapes=0)  # compile no shape: eager
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     value = compiled.loss(torch.ones(3, 2))
        >>> compiled.eager_reason
        'its batches come in more than 0 shapes'
    """

    __slots__ = ("step", "name", "eager_loss", "compiled_loss", "shapes", "max_shapes", "eager_reason",
                 "cuda_graphs", "opt_steps", "hits", "limit_warned")

    def __init__(self, step: Step, device: torch.device, *, scaled: bool = False,
                 max_shapes: int = MAX_SHAPES, cuda_graphs: bool | None = None) -> None:
        self.step = step
        self.name = step.name
        self.cuda_graphs = device.type == "cuda" if cuda_graphs is None else cuda_graphs
        mode = "reduce-overhead" if self.cuda_graphs else None
        self.eager_loss = step.loss
        # CUDA graphs need static shapes (one graph per shape); elsewhere a second shape (an epoch's
        # shorter last batch) makes one graph with a dynamic batch size, as torch.compile does by default
        self.compiled_loss = _compile(step.loss, mode=mode, dynamic=False if self.cuda_graphs else None)
        self.shapes: set[tuple[int, ...]] = set()
        self.max_shapes = max_shapes
        self.eager_reason: str | None = None
        self.opt_steps: dict[int, Callable[[], Any]] = {}
        why_not = ("it has a learning-rate schedule (a changing float learning rate recompiles the step)"
                   if step.schedulers else "float16 loss scaling steps it" if scaled else None)
        if why_not is not None:
            self._warn(f"its optimizer step runs eagerly: {why_not}")
        else:
            for opt in step.optimizers:
                self.opt_steps[id(opt)] = _compile(opt.step, dynamic=False)
        self.hits = _limit_hits().hits  # dynamo's recompile-limit reports, read after each compiled call
        self.limit_warned = False

    def _warn(self, what: str) -> None:
        warnings.warn(f"Trainer(compile=True): step {self.name!r}: {what}.", UserWarning, stacklevel=5)

    def _fall_back(self, reason: str) -> None:
        self.eager_reason = reason
        self._warn(f"its update runs eagerly from here on: {reason}")

    def _limit_hit(self, before: int, what: str) -> None:
        """Dynamo gave up compiling a function during this step's call: say so, once per step."""
        reports = self.hits[before:]
        del self.hits[before:]
        if self.limit_warned:
            return
        self.limit_warned = True
        self._warn(
            f"torch.compile stopped recompiling {what} ({'; '.join(reports)}): calls that its compiled graphs do "
            "not fit run eagerly from here on. Dynamo recompiles a function for each new model, optimizer or "
            "input shape, up to that limit; raise it (e.g. torch._dynamo.config.recompile_limit = 64, or "
            "accumulated_recompile_limit) or call torch._dynamo.reset() between runs that build new ones"
        )

    def loss(self, batch: Any) -> Any:
        """The step's loss on ``batch``: compiled while its shapes are few, eager after."""
        if self.eager_reason is not None:
            return self.eager_loss(batch)
        first = first_tensor(batch)
        shape = () if first is None else tuple(first.shape)
        if shape not in self.shapes:
            if len(self.shapes) >= self.max_shapes:
                self._fall_back(f"its batches come in more than {self.max_shapes} shapes")
                return self.eager_loss(batch)
            self.shapes.add(shape)
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # a new update: the last one's graph outputs may go
        hits = len(self.hits)
        try:
            out = self.compiled_loss(batch)
        except _compile_errors() as error:
            self._fall_back(f"torch.compile failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})")
            return self.eager_loss(batch)
        if len(self.hits) != hits:
            self._limit_hit(hits, "its loss")
        if self.cuda_graphs:
            out = _cloned(out)  # graph outputs are overwritten by the next replay; the run keeps losses
        return out

    def step_optimizers(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        """``opt.step()`` for each, through its compiled step where it has one."""
        steps = self.opt_steps
        for opt in optimizers:
            compiled = steps.get(id(opt))
            if compiled is None:
                opt.step()
                continue
            hits = len(self.hits)
            try:
                compiled()
                if len(self.hits) != hits:
                    self._limit_hit(hits, f"its {type(opt).__name__} step")
            except _compile_errors() as error:
                del steps[id(opt)]
                self._warn(f"its {type(opt).__name__} step runs eagerly: torch.compile failed "
                           f"({type(error).__name__}: {str(error).splitlines()[0][:200]})")
                opt.step()


def _cloned(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.clone()
    if isinstance(out, dict):
        return {k: _cloned(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)) and not hasattr(out, "_fields"):
        return type(out)(_cloned(v) for v in out)
    return out
