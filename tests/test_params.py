from __future__ import annotations

import copy
from fnmatch import fnmatchcase

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

from trainflow.params import freeze, group, named_parameters, param_groups, unfreeze


class LeNet(nn.Module):
    """The LeNet of MegEngine's parameter-group example: 1x28x28 in, 10 out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 4 * 4, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = x.flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


@pytest.fixture
def net() -> LeNet:
    torch.manual_seed(0)
    return LeNet()


def _params(module: nn.Module, prefix: str) -> list[nn.Parameter]:
    return [p for n, p in module.named_parameters() if n.startswith(prefix)]


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 3) -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 28, 28, generator=gen)
    y = torch.randint(0, 10, (8,), generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _ids(params) -> list[int]:
    return [id(p) for p in params]


# --- param_groups -------------------------------------------------------------


def test_lenet_groups_sizes_and_lrs(net):
    groups = param_groups(net, {"conv*": {"lr": 0.05}, "fc*": {"lr": 0.01}})
    assert [g["name"] for g in groups] == ["conv*", "fc*"]
    assert [len(g["params"]) for g in groups] == [4, 6]
    assert [g["lr"] for g in groups] == [0.05, 0.01]
    assert _ids(groups[0]["params"]) == _ids(_params(net, "conv"))
    assert _ids(groups[1]["params"]) == _ids(_params(net, "fc"))


def test_lenet_trains_bit_identically_to_hand_built_groups(net):
    by_hand = copy.deepcopy(net)
    opt_rules = torch.optim.SGD(
        param_groups(net, {"conv*": {"lr": 0.05}, "fc*": {"lr": 0.01}}), lr=0.1, momentum=0.9
    )
    opt_hand = torch.optim.SGD(
        [
            {"params": _params(by_hand, "conv"), "lr": 0.05},
            {"params": _params(by_hand, "fc"), "lr": 0.01},
        ],
        lr=0.1,
        momentum=0.9,
    )
    before = [p.detach().clone() for p in net.parameters()]
    _train(net, opt_rules)
    _train(by_hand, opt_hand)
    for (name, a), b, old in zip(net.named_parameters(), by_hand.parameters(), before):
        assert torch.equal(a, b), name
        assert not torch.equal(a, old), name  # it really trained


def test_alternatives_first_match_wins_name_and_defaults(net):
    groups = param_groups(
        net,
        {
            "fc3.*": {"lr": 0.5, "name": "head"},
            "conv1.*|fc*": {"lr": 0.01},
            "*": {},
        },
        lr=0.1,
        weight_decay=1e-4,
    )
    assert [g["name"] for g in groups] == ["head", "conv1.*|fc*", "*"]
    assert [g["lr"] for g in groups] == [0.5, 0.01, 0.1]  # rule overrides default
    assert all(g["weight_decay"] == 1e-4 for g in groups)
    assert all(set(g) == {"params", "name", "lr", "weight_decay"} for g in groups)
    names = {id(p): n for n, p in net.named_parameters()}
    assert [[names[id(p)] for p in g["params"]] for g in groups] == [
        ["fc3.weight", "fc3.bias"],
        ["conv1.weight", "conv1.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"],
        ["conv2.weight", "conv2.bias"],
    ]
    torch.optim.SGD(groups)  # torch accepts them as they are


def test_alternatives_allow_spaces_around_bar(net):
    groups = param_groups(net, {"conv* | fc*": {}})
    assert len(groups[0]["params"]) == 10


def test_dict_of_models_prefixes_names():
    torch.manual_seed(0)
    gen, disc = nn.Linear(3, 4), nn.Sequential(nn.Linear(4, 1))
    models = {"gen": gen, "disc": disc}
    assert [n for n, _ in named_parameters(models)] == [
        "gen.weight",
        "gen.bias",
        "disc.0.weight",
        "disc.0.bias",
    ]
    groups = param_groups(models, {"gen.*": {"lr": 1.0}, "disc.*": {"lr": 2.0}}, momentum=0.5)
    assert [(g["name"], g["lr"], g["momentum"]) for g in groups] == [
        ("gen.*", 1.0, 0.5),
        ("disc.*", 2.0, 0.5),
    ]
    assert _ids(groups[0]["params"]) == _ids(gen.parameters())
    assert _ids(groups[1]["params"]) == _ids(disc.parameters())


def test_tied_parameters_are_grouped_once():
    shared = nn.Linear(2, 2)
    net = nn.Sequential(shared, nn.ReLU(), shared)
    assert [n for n, _ in named_parameters(net)] == ["0.weight", "0.bias"]
    (only,) = param_groups(net, {"*": {}})
    assert _ids(only["params"]) == _ids(shared.parameters())
    # also across the modules of a dict: first name wins
    assert [n for n, _ in named_parameters({"a": shared, "b": shared})] == ["a.weight", "a.bias"]


# --- group --------------------------------------------------------------------


def test_group_returns_live_entry_and_zero_lr_stops_updates(net):
    opt = torch.optim.SGD(param_groups(net, {"conv*": {}, "fc*": {}}), lr=0.1)
    entry = group(opt, "fc*")
    assert entry is opt.param_groups[1]
    entry["lr"] = 0.0
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    _train(net, opt)
    for name, p in net.named_parameters():
        assert torch.equal(p, before[name]) == name.startswith("fc"), name


def test_group_by_explicit_name(net):
    opt = torch.optim.Adam(param_groups(net, {"conv*": {"name": "body"}, "*": {}}), lr=1e-3)
    assert group(opt, "body") is opt.param_groups[0]
    assert group(opt, "*") is opt.param_groups[1]


# --- freeze / unfreeze --------------------------------------------------------


def test_freeze_unfreeze_toggle_and_frozen_params_leave_groups(net):
    assert freeze(net, "conv1.*|fc1.weight") == ["conv1.weight", "conv1.bias", "fc1.weight"]
    assert [n for n, p in net.named_parameters() if not p.requires_grad] == [
        "conv1.weight",
        "conv1.bias",
        "fc1.weight",
    ]
    groups = param_groups(net, {"conv*": {}, "fc*": {}})
    assert [len(g["params"]) for g in groups] == [2, 5]
    assert all(p.requires_grad for g in groups for p in g["params"])

    assert unfreeze(net, ["conv1.weight", "fc1.*"]) == ["conv1.weight", "fc1.weight", "fc1.bias"]
    assert [n for n, p in net.named_parameters() if not p.requires_grad] == ["conv1.bias"]
    groups = param_groups(net, {"conv*": {}, "fc*": {}})
    assert [len(g["params"]) for g in groups] == [3, 6]


def test_freeze_returns_all_matched_even_if_already_frozen(net):
    freeze(net, "conv1.*")
    assert freeze(net, "conv*") == ["conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias"]


def test_freeze_on_dict_of_models():
    models = {"gen": nn.Linear(2, 2), "disc": nn.Linear(2, 1)}
    assert freeze(models, "disc.*") == ["disc.weight", "disc.bias"]
    assert not models["disc"].weight.requires_grad and models["gen"].weight.requires_grad


def test_frozen_params_need_no_rule_and_all_frozen_rule_gives_no_group(net):
    freeze(net, "conv*")
    # conv params match no rule: fine, they are frozen
    groups = param_groups(net, {"fc*": {}})
    assert [len(g["params"]) for g in groups] == [6]
    # a rule matching only frozen params is valid but yields no (empty) group
    groups = param_groups(net, {"conv*": {"lr": 1.0}, "fc*": {}})
    assert [g["name"] for g in groups] == ["fc*"]
    opt = torch.optim.SGD(groups, lr=0.1)
    with pytest.raises(ValueError, match=r"No group is named 'conv\*'.*all frozen give no group"):
        group(opt, "conv*")


# --- errors -------------------------------------------------------------------


@pytest.mark.parametrize("bad", [[nn.Linear(2, 2)], "net", {"a": 3}, {1: nn.Linear(2, 2)}])
def test_error_model_wrong_type(bad):
    with pytest.raises(TypeError, match=r"`model` must be an nn.Module or a dict.*Received: model="):
        param_groups(bad, {"*": {}})
    with pytest.raises(TypeError, match=r"`model` must be an nn.Module"):
        freeze(bad, "*")


def test_error_model_without_parameters():
    with pytest.raises(ValueError, match=r"`model` has no parameters.*Received: model=ReLU"):
        param_groups(nn.ReLU(), {"*": {}})


def test_error_rules_not_a_dict(net):
    with pytest.raises(
        TypeError, match=r"`rules` must be a dict .* got list.*Received: rules=\['conv\*'\]"
    ):
        param_groups(net, ["conv*"])


def test_error_rules_empty(net):
    with pytest.raises(ValueError, match=r"`rules` is empty.*\{'\*': \{\}\}.*Received: rules=\{\}"):
        param_groups(net, {})


def test_error_rule_key_not_str(net):
    with pytest.raises(TypeError, match=r"key of `rules` must be a str.*got 3 of type int"):
        param_groups(net, {3: {}})


def test_error_rule_value_not_dict(net):
    with pytest.raises(
        TypeError,
        match=r"value of rule 'fc\*' in `rules` must be a dict.*got float.*\{'fc\*': \{'lr': 0.01\}\}"
        r".*Received: rules=\{'fc\*': 0.01\}",
    ):
        param_groups(net, {"fc*": 0.01})


def test_error_rule_sets_params_or_bad_name(net):
    with pytest.raises(ValueError, match=r"Rule 'fc\*' in `rules` sets 'params'.*Remove"):
        param_groups(net, {"fc*": {"params": []}})
    with pytest.raises(TypeError, match=r"'name' of rule 'fc\*' in `rules` must be a str, but got 1"):
        param_groups(net, {"fc*": {"name": 1}, "*": {}})


def test_error_default_params_or_name(net):
    with pytest.raises(TypeError, match=r"default name='x'.*Set 'name' inside a rule"):
        param_groups(net, {"*": {}}, name="x")


def test_error_duplicate_group_names(net):
    with pytest.raises(ValueError, match=r"Group names must be unique.*\['head'\].*own 'name'"):
        param_groups(net, {"conv*": {"name": "head"}, "fc*": {"name": "head"}})


def test_error_rule_matches_nothing_lists_close_names(net):
    rules = {"conv*": {}, "fc1.weigth": {}, "*": {}}
    with pytest.raises(ValueError) as info:
        param_groups(net, rules)
    msg = str(info.value)
    assert "Rule 'fc1.weigth' in `rules` matches no parameter" in msg
    assert "Closest parameter names: ['fc1.weight'" in msg
    assert "'*fc*' to match anywhere" in msg
    assert msg.endswith(f"Received: rules={rules!r}")


def test_error_rule_matches_nothing_falls_back_to_first_names():
    models = {"gen": nn.Linear(2, 2)}
    with pytest.raises(
        ValueError,
        match=r"Rule 'zz\*' .* matches no parameter.*start with: \['gen.weight', 'gen.bias'\]",
    ):
        param_groups(models, {"zz*": {}})


def test_error_shadowed_rule(net):
    with pytest.raises(
        ValueError,
        match=r"Rule 'fc3\*' in `rules` is shadowed.*earlier rules \['\*'\].*Move 'fc3\*' before",
    ):
        param_groups(net, {"*": {}, "fc3*": {"lr": 1.0}})


def test_error_unmatched_trainable_parameters(net):
    with pytest.raises(
        ValueError,
        match=r"6 trainable parameter\(s\) of `model` match no rule in `rules`: "
        r"\['fc1.weight', .*'fc3.bias'\]. Add a rule .*'\*': \{\}.*Received: rules=\{'conv\*': \{\}\}",
    ):
        param_groups(net, {"conv*": {}})


def test_error_unmatched_list_is_truncated():
    net = nn.Sequential(*[nn.Linear(1, 1) for _ in range(7)])  # 14 parameters
    with pytest.raises(ValueError, match=r"13 trainable .*'5.weight', and 3 more\]"):
        param_groups(net, {"0.weight": {}})


def test_error_everything_frozen(net):
    freeze(net, "*")
    with pytest.raises(ValueError, match=r"Every parameter of `model` is frozen.*unfreeze\("):
        param_groups(net, {"*": {}})


def test_error_group_not_an_optimizer(net):
    with pytest.raises(
        TypeError, match=r"`optimizer` must be a torch.optim.Optimizer, but got list.*Received"
    ):
        group(param_groups(net, {"*": {}}), "*")


def test_error_group_unknown_name_lists_names_and_unnamed(net):
    freeze(net, "fc2*|fc3*")
    opt = torch.optim.SGD(param_groups(net, {"conv*": {}, "fc1*": {}}), lr=0.1)
    unfreeze(net, "*")
    opt.add_param_group({"params": _params(net, "fc2") + _params(net, "fc3")})
    with pytest.raises(
        ValueError,
        match=r"No group is named 'fc' in `optimizer`; its groups are \['conv\*', 'fc1\*', '#2'\]"
        r".*Received: name='fc'",
    ):
        group(opt, "fc")


def test_error_group_ambiguous_name(net):
    opt = torch.optim.SGD(param_groups(net, {"conv*": {}, "fc*": {}}), lr=0.1)
    opt.param_groups[1]["name"] = "conv*"
    with pytest.raises(ValueError, match=r"Several groups are named 'conv\*'"):
        group(opt, "conv*")


def test_error_freeze_pattern_matches_nothing(net):
    with pytest.raises(
        ValueError,
        match=r"Pattern 'conv3\*' in `patterns` matches no parameter.*'conv1.weight'"
        r".*Received: patterns=\['fc1\*', 'conv3\*'\]",
    ):
        unfreeze(net, ["fc1*", "conv3*"])
    assert all(p.requires_grad for p in net.parameters())  # nothing changed on error


@pytest.mark.parametrize("bad", [3, [], ["fc*", 3]])
def test_error_freeze_patterns_wrong_type(net, bad):
    with pytest.raises(TypeError, match=r"`patterns` must be a str .*\['conv\*', 'fc1\*'\]"):
        freeze(net, bad)


# --- property: random module trees and rule sets ------------------------------

_NAMES = ["enc", "dec", "fc", "fc1", "head", "conv", "a", "b"]


@st.composite
def _trees(draw, depth: int = 0) -> nn.Module:
    kind = draw(st.sampled_from(["linear", "seq", "dict"] if depth < 3 else ["linear"]))
    if kind == "linear":
        return nn.Linear(1, 1, bias=draw(st.booleans()))
    if kind == "seq":
        children = draw(st.lists(_trees(depth + 1), min_size=1, max_size=3))
        if draw(st.booleans()):
            children.append(children[0])  # a tied (shared) submodule
        return nn.Sequential(*children)
    keys = draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=3, unique=True))
    return nn.ModuleDict({k: draw(_trees(depth + 1)) for k in keys})


@st.composite
def _fragments(draw, names: list[str]) -> str:
    name = draw(st.sampled_from(names))
    parts = name.split(".")
    cut = draw(st.integers(0, len(parts)))
    return draw(
        st.sampled_from(
            [
                name,
                ".".join(parts[:cut]) + "*",
                "*" + ".".join(parts[cut:]),
                ".".join(parts[:cut] + ["*"] + parts[cut + 1 :]),
                "*",
                "nomatch*",
            ]
        )
    )


@st.composite
def _cases(draw):
    if draw(st.booleans()):
        model = draw(_trees())
    else:
        keys = draw(st.lists(st.sampled_from(_NAMES), min_size=1, max_size=2, unique=True))
        model = {k: draw(_trees(1)) for k in keys}
    named = named_parameters(model)
    for _, p in named:  # about one in four frozen
        p.requires_grad_(draw(st.sampled_from([True, True, True, False])))
    names = [n for n, _ in named]
    patterns = draw(
        st.lists(
            st.lists(_fragments(names), min_size=1, max_size=2).map("|".join),
            min_size=1,
            max_size=4,
            unique=True,
        )
    )
    if "*" not in patterns and draw(st.booleans()):
        patterns.append("*")
    rules = {pat: {"lr": float(i + 1)} for i, pat in enumerate(patterns)}
    return model, named, rules


def _first_rule(rules: dict, name: str) -> str | None:
    for pat in rules:
        if any(fnmatchcase(name, alt) for alt in pat.split("|")):
            return pat
    return None


@settings(max_examples=60, deadline=None)
@given(_cases())
def test_property_every_trainable_param_in_exactly_one_group(case):
    model, named, rules = case
    owner = {n: _first_rule(rules, n) for n, _ in named}  # independent oracle
    trainable = [(n, p) for n, p in named if p.requires_grad]
    should_fail = (
        any(all(_first_rule({pat: 0}, n) is None for n, _ in named) for pat in rules)  # no match
        or any(pat not in owner.values() for pat in rules)  # matches, but shadowed
        or any(owner[n] is None for n, _ in trainable)  # unmatched trainable
        or not trainable
    )
    try:
        groups = param_groups(model, rules)
    except ValueError:
        assert should_fail
        return
    assert not should_fail
    in_groups = [id(p) for g in groups for p in g["params"]]
    assert len(in_groups) == len(set(in_groups))  # no parameter in two groups
    assert sorted(in_groups) == sorted(id(p) for _, p in trainable)  # each trainable once
    assert all(p.requires_grad for g in groups for p in g["params"])  # no frozen one
    assert all(g["params"] for g in groups)  # no empty group
    by_name = {g["name"]: g for g in groups}
    for n, p in trainable:  # first match wins
        assert id(p) in _ids(by_name[owner[n]]["params"])
        assert by_name[owner[n]]["lr"] == rules[owner[n]]["lr"]
    torch.optim.SGD(groups)


# --- rules that leave parameters out (value None) -------------------------------


def test_none_rule_leaves_its_parameters_out_and_trains_like_the_conv_only_optimizer(net):
    hand, start = copy.deepcopy(net), copy.deepcopy(net)
    groups = param_groups(net, {"conv*": {}, "*": None})
    assert [(g["name"], _ids(g["params"])) for g in groups] == [("conv*", _ids(_params(net, "conv")))]
    _train(net, torch.optim.SGD(groups, lr=0.1))
    _train(hand, torch.optim.SGD(_params(hand, "conv"), lr=0.1))
    for (name, a), b in zip(net.named_parameters(), hand.parameters()):
        assert torch.equal(a, b), name
    moved = {n for (n, a), b in zip(net.named_parameters(), start.parameters()) if not torch.equal(a, b)}
    assert moved == {n for n, _ in net.named_parameters() if n.startswith("conv")}


def test_none_rule_still_checks_patterns_for_typos(net):
    with pytest.raises(ValueError, match=r"Rule 'fcc\*' in `rules` matches no parameter"):
        param_groups(net, {"conv*": {}, "fcc*": None})


def test_error_unmatched_parameters_mention_the_none_rule(net):
    with pytest.raises(ValueError, match=r"'\*': None to leave them out of the optimizer"):
        param_groups(net, {"conv*": {}})


def test_error_every_rule_none(net):
    with pytest.raises(
        ValueError, match=r"Every rule in `rules` is None.*\{'conv\*': \{\}, '\*': None\}.*Received: rules=\{'\*': None\}"
    ):
        param_groups(net, {"*": None})


def test_error_rule_value_neither_dict_nor_none_says_none_is_allowed(net):
    with pytest.raises(TypeError, match=r"must be a dict of hyperparameters, or None.*\{'fc\*': None\}"):
        param_groups(net, {"conv*": {}, "fc*": 0.01})
