"""Parameter groups by name: glob rules over ``named_parameters()`` names.

``param_groups(model, rules)`` turns a dict of glob patterns into the list of
group dicts that every ``torch.optim`` optimizer accepts, ``group(opt, name)``
finds one of those groups again in a live optimizer, and ``freeze`` /
``unfreeze`` toggle ``requires_grad`` with the same patterns.

Patterns are shell-style globs (``fnmatch.fnmatchcase``, case-sensitive)
matched against full dotted parameter names such as ``"fc1.weight"``; ``|``
separates alternatives (``"fc*|classifier*"``). When the model is a dict of
modules, names are prefixed with the dict key: ``{"gen": G}`` gives
``"gen.fc1.weight"``.

Decisions, in brief:

* Rules are tried in dict order and the first match wins, so no parameter is
  ever in two groups. Every parameter, trainable or frozen, is claimed by the
  first rule it matches; which rules are valid therefore never depends on what
  is frozen.
* Frozen parameters (``requires_grad=False``) are claimed but left out of the
  groups, and need no rule. A rule whose parameters are all frozen is valid but
  yields no group: torch would accept an empty group, but it would only carry
  hyperparameters for nothing, so it is dropped (``group(opt, name)`` then
  reports the name as unknown). To unfreeze parameters during a run, build the
  optimizer *before* freezing them: an optimizer may hold frozen parameters (they
  get no gradient, so torch skips them) and updates them once they are unfrozen.
* ``freeze(..., batchnorm="eval")`` also keeps the batch-norm layers it freezes in
  eval mode during ``Trainer.fit`` (running statistics fixed, like Keras's
  ``trainable=False``); the default ``"train"`` is PyTorch's behaviour.
* A rule whose value is ``None`` claims its parameters and leaves them out of the
  optimizer (``{"conv*": {}, "*": None}``: optimize only the conv layers). Leaving
  parameters out is then explicit, and the coverage check below still catches typos.
* A rule that matches no parameter, a rule whose every parameter was already
  taken by an earlier rule, and a trainable parameter that no rule matches are
  all errors: each is almost always a typo or a mis-ordered rule.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from trainflow.models import KEEP_EVAL, named_modules

# named_parameters, match, toggle, check_patterns and check_batchnorm are shared helpers for
# other modules (the trainer, callbacks.freezing), deliberately not exported.
__all__ = ["param_groups", "group", "freeze", "unfreeze"]

_SHOW = 10  # how many names an error message lists before "and N more"

_MAX_REPR = 300  # characters of a received value quoted in an error message


def _short(value: Any) -> str:
    """repr for error messages, cut short (module reprs can be huge)."""
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[: _MAX_REPR - 3] + "..."


def _listing(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_SHOW])
    more = len(names) - _SHOW
    return f"[{shown}{f', and {more} more' if more > 0 else ''}]"


def named_parameters(
    models: nn.Module | Mapping[str, nn.Module], *, argument: str = "model"
) -> list[tuple[str, nn.Parameter]]:
    """``named_parameters()`` of a module, or of a dict of modules with prefixes.

    For a dict ``{key: module}`` each name is prefixed ``"<key>."``. Tied
    parameters appear once, under their first name, as in
    ``nn.Module.named_parameters()`` (also across the modules of a dict).
    ``argument`` is the name used in error messages.

    >>> from torch import nn
    >>> [name for name, _ in named_parameters(nn.Linear(2, 1))]
    ['weight', 'bias']
    >>> [name for name, _ in named_parameters({"gen": nn.Linear(2, 1)})]
    ['gen.weight', 'gen.bias']
    """
    if isinstance(models, nn.Module):
        return list(models.named_parameters())
    if not isinstance(models, Mapping) or not all(
        isinstance(k, str) and isinstance(v, nn.Module) for k, v in models.items()
    ):
        raise TypeError(
            f"`{argument}` must be an nn.Module or a dict mapping str names to "
            f"nn.Module, but got {type(models).__name__} "
            f"{'with other keys or values ' if isinstance(models, Mapping) else ''}"
            f"instead. Pass the model itself (e.g. `net`) or a dict such as "
            f"{{'gen': G, 'disc': D}}. Received: {argument}={_short(models)}"
        )
    seen: set[int] = set()
    named = []
    for key, module in models.items():
        for name, param in module.named_parameters():
            if id(param) not in seen:
                seen.add(id(param))
                named.append((f"{key}.{name}", param))
    return named


def _alternatives(pattern: str) -> list[str]:
    return [alt.strip() for alt in pattern.split("|")]


def _matches(pattern: str, name: str) -> bool:
    return any(fnmatchcase(name, alt) for alt in _alternatives(pattern))


def _similarity(alternative: str, name: str) -> float:
    """How close a glob alternative is to a name, or to one of its dotted prefixes."""
    core = alternative.replace("*", "").replace("?", "")
    parts = name.split(".")
    prefixes = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return max(difflib.SequenceMatcher(None, core, p).ratio() for p in prefixes)


def _no_match_hint(pattern: str, names: list[str]) -> str:
    """Say which names a pattern may have meant, and how patterns are read."""
    score = {n: max(_similarity(alt, n) for alt in _alternatives(pattern)) for n in names}
    close = sorted((n for n in names if score[n] >= 0.6), key=lambda n: -score[n])
    if close:
        seen = f"Closest parameter names: {_listing(close[:5])}."
    else:
        seen = f"Parameter names start with: {_listing(names[:5])}."
    return (
        f"{seen} Patterns are fnmatch globs matched against the full dotted "
        f"name (e.g. 'fc1.weight'; use '*fc*' to match anywhere), and '|' "
        f"separates alternatives."
    )


def _check_rules(rules: Any, defaults: dict[str, Any]) -> None:
    received = f"Received: rules={_short(rules)}"
    if not isinstance(rules, Mapping):
        raise TypeError(
            f"`rules` must be a dict mapping glob patterns to dicts of "
            f"hyperparameters, but got {type(rules).__name__}. Write e.g. "
            f"{{'conv*': {{}}, 'fc*': {{'lr': 0.01}}}}. {received}"
        )
    if not rules:
        raise ValueError(
            f"`rules` is empty, so no parameter would be optimized. Add at least "
            f"one rule; {{'*': {{}}}} puts every parameter in one group. {received}"
        )
    for pattern, hparams in rules.items():
        if not isinstance(pattern, str):
            raise TypeError(
                f"Every key of `rules` must be a str glob pattern, but got "
                f"{pattern!r} of type {type(pattern).__name__}. Write the pattern "
                f"as a string, e.g. 'fc*'. {received}"
            )
        if hparams is None:  # its parameters are left out of the optimizer
            continue
        if not isinstance(hparams, Mapping):
            raise TypeError(
                f"The value of rule {pattern!r} in `rules` must be a dict of "
                f"hyperparameters, or None to leave its parameters out, but got "
                f"{type(hparams).__name__}. Write e.g. {{{pattern!r}: {{'lr': 0.01}}}}, "
                f"{{{pattern!r}: {{}}}} to use the defaults, or {{{pattern!r}: None}}. {received}"
            )
        if "params" in hparams:
            raise ValueError(
                f"Rule {pattern!r} in `rules` sets 'params', but param_groups() "
                f"fills 'params' itself from the pattern. Remove the 'params' "
                f"key. {received}"
            )
        if "name" in hparams and not isinstance(hparams["name"], str):
            raise TypeError(
                f"The 'name' of rule {pattern!r} in `rules` must be a str, but got "
                f"{hparams['name']!r}. Use a string such as 'head', or drop 'name' "
                f"to name the group by its pattern. {received}"
            )
    for key in ("params", "name"):
        if key in defaults:
            raise TypeError(
                f"param_groups() got the default {key}={_short(defaults[key])}, "
                f"but {key!r} is set per group. Set 'name' inside a rule, e.g. "
                f"{{'fc*': {{'name': 'head'}}}}; 'params' comes from the patterns."
            )
    names = [hp.get("name", p) for p, hp in rules.items() if hp is not None]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(
            f"Group names must be unique so that group(optimizer, name) can find "
            f"them, but {_listing(duplicates)} is used by several rules in "
            f"`rules`. Give each rule its own 'name'. {received}"
        )


def param_groups(
    model: nn.Module | Mapping[str, nn.Module],
    rules: Mapping[str, Mapping[str, Any] | None],
    **defaults: Any,
) -> list[dict[str, Any]]:
    """Optimizer parameter groups from glob rules over parameter names.

    Each rule maps a pattern (``"conv*"``, ``"fc*|classifier*"``) to that
    group's hyperparameters; an optional ``"name"`` names the group (default:
    the pattern). Rules are tried in order and the first match wins. Returns
    ``[{"params": [...], "name": ..., **defaults, **hyperparameters}, ...]``
    in rule order, parameters in ``named_parameters()`` order, ready for any
    ``torch.optim`` optimizer. Frozen parameters are left out and need no
    rule; a rule that matches only frozen parameters gives no group. A rule whose
    value is ``None`` leaves the parameters it matches out of every group.

    Raises ValueError for a rule that matches no parameter, a rule entirely
    shadowed by earlier rules, or a trainable parameter that no rule matches.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.ModuleDict({"conv": nn.Conv2d(1, 4, 3), "fc": nn.Linear(4, 2)})
    >>> groups = param_groups(net, {"conv*": {}, "fc*": {"lr": 0.01}}, momentum=0.9)
    >>> [(g["name"], len(g["params"]), g.get("lr")) for g in groups]
    [('conv*', 2, None), ('fc*', 2, 0.01)]
    >>> opt = torch.optim.SGD(groups, lr=0.1)
    >>> [g["lr"] for g in opt.param_groups]
    [0.1, 0.01]
    >>> [g["name"] for g in param_groups(net, {"conv*": {}, "*": None})]  # only the conv layer
    ['conv*']
    """
    named = named_parameters(model, argument="model")
    _check_rules(rules, defaults)
    names = [name for name, _ in named]
    if not names:
        raise ValueError(
            f"`model` has no parameters, so there is nothing to group. Pass the "
            f"module whose parameters should be optimized. "
            f"Received: model={_short(model)}"
        )

    claimed: dict[str, str] = {}  # parameter name -> pattern of the rule that took it
    for pattern in rules:
        matched = [n for n in names if _matches(pattern, n)]
        if not matched:
            raise ValueError(
                f"Rule {pattern!r} in `rules` matches no parameter of `model`. "
                f"{_no_match_hint(pattern, names)} Received: rules={_short(rules)}"
            )
        fresh = [n for n in matched if n not in claimed]
        if not fresh:
            earlier = sorted({claimed[n] for n in matched}, key=list(rules).index)
            raise ValueError(
                f"Rule {pattern!r} in `rules` is shadowed: every parameter it "
                f"matches was already taken by earlier rules {_listing(earlier)}, "
                f"because the first matching rule wins. Move {pattern!r} before "
                f"them (most specific rules first) or remove it. "
                f"Received: rules={_short(rules)}"
            )
        claimed.update(dict.fromkeys(fresh, pattern))

    unmatched = [n for n, p in named if p.requires_grad and n not in claimed]
    if unmatched:
        raise ValueError(
            f"{len(unmatched)} trainable parameter(s) of `model` match no rule in "
            f"`rules`: {_listing(unmatched)}. Add a rule for them, e.g. a last "
            f"catch-all rule '*': {{}}, or '*': None to leave them out of the "
            f"optimizer, or freeze them with freeze(model, ...). "
            f"Received: rules={_short(rules)}"
        )

    groups = []
    for pattern, hparams in rules.items():
        params = [p for n, p in named if p.requires_grad and claimed.get(n) == pattern]
        if params and hparams is not None:
            extra = {k: v for k, v in hparams.items() if k != "name"}
            groups.append(
                {"params": params, "name": hparams.get("name", pattern), **defaults, **extra}
            )
    if not groups and any(hp is not None for hp in rules.values()):
        raise ValueError(
            f"Every parameter of `model` is frozen (requires_grad=False), so there "
            f"is nothing to optimize. Unfreeze some, e.g. unfreeze(model, 'fc*'). "
            f"Received: model={_short(model)}"
        )
    if not groups:
        raise ValueError(
            f"Every rule in `rules` is None, so every parameter is left out and there "
            f"is nothing to optimize. Give the parameters to optimize a dict of "
            f"hyperparameters, e.g. {{'conv*': {{}}, '*': None}}. Received: rules={_short(rules)}"
        )
    return groups


def group(optimizer: torch.optim.Optimizer, name: str) -> dict[str, Any]:
    """The live ``optimizer.param_groups`` entry whose ``"name"`` is ``name``.

    Changing the returned dict changes the optimizer.

    >>> import torch
    >>> from torch import nn
    >>> net = nn.ModuleDict({"conv": nn.Conv2d(1, 4, 3), "fc": nn.Linear(4, 2)})
    >>> opt = torch.optim.SGD(param_groups(net, {"conv*": {}, "fc*": {}}), lr=0.1)
    >>> group(opt, "fc*")["lr"] = 0.0
    >>> [g["lr"] for g in opt.param_groups]
    [0.1, 0.0]
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(
            f"`optimizer` must be a torch.optim.Optimizer, but got "
            f"{type(optimizer).__name__}. Pass the optimizer built from "
            f"param_groups(...), e.g. group(opt, 'fc*'). "
            f"Received: optimizer={_short(optimizer)}"
        )
    found = [g for g in optimizer.param_groups if g.get("name") == name]
    if len(found) == 1:
        return found[0]
    existing = [
        str(g["name"]) if "name" in g else f"#{i}"
        for i, g in enumerate(optimizer.param_groups)
    ]
    problem = "several groups are" if found else "no group is"
    raise ValueError(
        f"{problem.capitalize()} named {name!r} in `optimizer`; its groups are "
        f"{_listing(existing)} (#i: unnamed group at index i). Use one of these "
        f"names; groups built by param_groups() are named by their rule's "
        f"pattern or its 'name', and rules whose parameters are all frozen give "
        f"no group. Received: name={name!r}"
    )


# --- freezing -------------------------------------------------------------------

#: the choices of ``freeze(..., batchnorm=...)``
BATCHNORM = ("train", "eval")


def _prefix(owner: str) -> str:
    return f"{owner}: " if owner else ""


def check_batchnorm(batchnorm: Any, *, owner: str = "freeze") -> str:
    """``batchnorm`` if it is ``"train"`` or ``"eval"``; TypeError/ValueError naming it otherwise."""
    if isinstance(batchnorm, str) and batchnorm in BATCHNORM:
        return batchnorm
    error = ValueError if isinstance(batchnorm, str) else TypeError
    raise error(
        f"{_prefix(owner)}`batchnorm` must be 'train' (a frozen batch-norm layer still "
        f"updates its running statistics in train mode, as in PyTorch) or 'eval' (it "
        f"stays in eval mode during fit, so its statistics stay fixed, like Keras's "
        f"trainable=False). Received: batchnorm={_short(batchnorm)}. Pass "
        f"batchnorm='eval' to fix the statistics of the batch-norm layers you freeze."
    )


def check_patterns(patterns: Any, *, owner: str = "") -> list[str]:
    """``patterns`` (a str or a non-empty list of str) as a list; TypeError otherwise."""
    if isinstance(patterns, str):
        return [patterns]
    if isinstance(patterns, (list, tuple)) and patterns and all(isinstance(p, str) for p in patterns):
        return list(patterns)
    raise TypeError(
        f"{_prefix(owner)}`patterns` must be a str (with '|' between alternatives) or a "
        f"non-empty list of str, but got {type(patterns).__name__}. Write e.g. "
        f"'conv*|fc1*' or ['conv*', 'fc1*']. Received: patterns={_short(patterns)}"
    )


def match(
    model: nn.Module | Mapping[str, nn.Module], patterns: Any, *, owner: str = ""
) -> list[tuple[str, nn.Parameter]]:
    """The ``(name, parameter)`` pairs of ``model`` matching ``patterns``, in order.

    Raises TypeError for a bad ``model`` or ``patterns`` and ValueError for a pattern
    that matches no parameter; ``owner`` prefixes the messages (e.g. ``"Unfreeze"``).

    >>> from torch import nn
    >>> net = nn.ModuleDict({"conv": nn.Conv2d(1, 4, 3), "fc": nn.Linear(4, 2)})
    >>> [name for name, _ in match(net, "fc*")]
    ['fc.weight', 'fc.bias']
    """
    named = named_parameters(model, argument="model")
    pattern_list = check_patterns(patterns, owner=owner)
    names = [n for n, _ in named]
    for pattern in pattern_list:
        if not any(_matches(pattern, n) for n in names):
            raise ValueError(
                f"{_prefix(owner)}Pattern {pattern!r} in `patterns` matches no parameter of "
                f"`model`. {_no_match_hint(pattern, names)} "
                f"Received: patterns={_short(patterns)}"
            )
    return [(n, p) for n, p in named if any(_matches(pat, n) for pat in pattern_list)]


def toggle(
    model: nn.Module | Mapping[str, nn.Module],
    patterns: Any,
    *,
    trainable: bool,
    batchnorm: str = "train",
    owner: str = "",
    apply: bool = True,
) -> tuple[list[str], list[nn.Module]]:
    """What :func:`freeze` (``trainable=False``) and :func:`unfreeze` do, for callbacks too.

    Returns the matched parameter names and the batch-norm modules whose keep-eval flag
    this call set or cleared, so that a caller inside ``fit`` can switch their mode now
    (the trainer reads the flag when ``fit`` starts). Checks everything before changing
    anything: on error, no parameter or module is touched. ``apply=False`` only checks
    (callbacks do this when built and when ``fit`` starts, long before their epoch).
    """
    batchnorm = check_batchnorm(batchnorm, owner=owner or "freeze")
    matched = match(model, patterns, owner=owner)
    chosen = {id(p) for _, p in matched}
    param_names = {id(p): n for n, p in named_parameters(model)}
    norms = []  # batch-norm modules this call freezes entirely / unfreezes partly or fully
    for module_name, module in named_modules(model):
        own = list(module.parameters(recurse=False))
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not own:
            continue
        hit = [p for p in own if id(p) in chosen]
        if trainable and hit:
            norms.append(module)
        elif not trainable and len(hit) == len(own):
            norms.append(module)
        elif not trainable and hit and batchnorm == "eval":
            frozen = [param_names[id(p)] for p in hit]
            left = [param_names[id(p)] for p in own if id(p) not in chosen]
            raise ValueError(
                f"{_prefix(owner)}batchnorm='eval' keeps a batch-norm layer in eval mode only "
                f"when all of its parameters are frozen, but `patterns` freezes part of "
                f"{module_name!r}: {_listing(frozen)} but not {_listing(left)}. Received: "
                f"patterns={_short(patterns)}, batchnorm='eval'. Widen the patterns to the "
                f"whole layer (e.g. {module_name + '.*'!r}), or pass batchnorm='train'."
            )
    if not apply:
        return [n for n, _ in matched], []
    for _, param in matched:
        param.requires_grad_(trainable)
    changed = []
    keep_eval = not trainable and batchnorm == "eval"
    for module in norms:
        if bool(getattr(module, KEEP_EVAL, False)) != keep_eval:
            changed.append(module)
        if keep_eval:
            setattr(module, KEEP_EVAL, True)
        elif hasattr(module, KEEP_EVAL):
            delattr(module, KEEP_EVAL)
    return [n for n, _ in matched], changed


def freeze(
    model: nn.Module | Mapping[str, nn.Module],
    patterns: str | list[str],
    *,
    batchnorm: str = "train",
) -> list[str]:
    """Set ``requires_grad=False`` on the parameters matching ``patterns``.

    ``patterns`` is a glob str (``|`` between alternatives) or a list of them.
    Returns the names of all matched parameters (already frozen ones
    included), in ``named_parameters()`` order.

    A frozen parameter gets no gradient, so no optimizer changes it. To
    unfreeze it later in the same run (``callbacks.Unfreeze``), it must be in
    an optimizer: build the optimizer first, then freeze. ``param_groups``
    leaves parameters that are already frozen out of the groups.

    ``batchnorm`` decides what happens to the batch-norm layers whose
    parameters this call freezes entirely:

    * ``"train"`` (default, as in PyTorch): in train mode they still
      normalise with the batch's statistics and update their running mean and
      variance; only their affine weight and bias are fixed.
    * ``"eval"`` (like Keras's ``trainable=False``): ``Trainer.fit`` keeps them
      in eval mode, so they normalise with their running statistics, which
      stay fixed. The layer is marked with ``_trainflow_keep_eval = True``; in
      a hand-written loop, call ``.eval()`` on it after ``model.train()``.

    The latest ``freeze``/``unfreeze`` call decides: ``batchnorm="train"``
    clears an earlier ``"eval"``, and :func:`unfreeze` clears it too. With
    ``"eval"``, a pattern that freezes only part of a batch-norm layer's
    parameters is an error. Layers without parameters (``affine=False``)
    are not matched by any pattern; set the attribute yourself if needed.

    >>> from torch import nn
    >>> net = nn.ModuleDict({"conv": nn.Conv2d(1, 4, 3), "fc": nn.Linear(4, 2)})
    >>> freeze(net, "conv*")
    ['conv.weight', 'conv.bias']
    >>> net.conv.weight.requires_grad
    False
    >>> net = nn.Sequential(nn.Linear(2, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    >>> freeze(net, "0.*|1.*", batchnorm="eval")
    ['0.weight', '0.bias', '1.weight', '1.bias']
    >>> net[1]._trainflow_keep_eval
    True
    """
    return toggle(model, patterns, trainable=False, batchnorm=batchnorm)[0]


def unfreeze(
    model: nn.Module | Mapping[str, nn.Module], patterns: str | list[str]
) -> list[str]:
    """Set ``requires_grad=True`` on the parameters matching ``patterns``.

    The counterpart of :func:`freeze`, with the same arguments and return value.
    A batch-norm layer any of whose parameters it unfreezes loses the mark set
    by ``freeze(..., batchnorm="eval")``: it trains (and updates its running
    statistics) in train mode again from the next ``fit``.

    >>> from torch import nn
    >>> net = nn.ModuleDict({"conv": nn.Conv2d(1, 4, 3), "fc": nn.Linear(4, 2)})
    >>> freeze(net, "*")
    ['conv.weight', 'conv.bias', 'fc.weight', 'fc.bias']
    >>> unfreeze(net, ["fc.weight", "fc.bias"])
    ['fc.weight', 'fc.bias']
    >>> [n for n, p in net.named_parameters() if p.requires_grad]
    ['fc.weight', 'fc.bias']
    """
    return toggle(model, patterns, trainable=True)[0]
