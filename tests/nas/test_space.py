"""Search spaces: choices, labels, search_space, fixed_arch and the replacement helpers."""

from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import assert_same_weights
from trainflow.nas import (
    InputChoice,
    LayerChoice,
    ValueChoice,
    fixed_arch,
    replace_input_choice,
    replace_layer_choice,
    search_space,
)
from trainflow.nas.space import ChosenInputs, _build_space


class Cell(nn.Module):
    """Two inputs, a chosen op on each, and a chosen skip input: every kind of choice once."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.op = LayerChoice({"linear": lambda: nn.Linear(width, width), "relu": nn.ReLU}, label="op")
        self.same_op = LayerChoice({"linear": lambda: nn.Linear(width, width), "relu": nn.ReLU}, label="op")
        self.skip = InputChoice(2, 1, reduction="sum", label="skip")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.op(x)
        return self.skip([a, self.same_op(a)])


def cell_space() -> nn.Module:
    width = ValueChoice([4, 6], label="width")
    return nn.Sequential(nn.Linear(3, width), Cell(width), nn.Linear(width, 1))


def eager_space() -> nn.Module:
    """Candidates given as modules (all of them constructed by the caller), unlabelled."""
    return nn.Sequential(
        nn.Linear(3, 5),
        LayerChoice([nn.Linear(5, 5), nn.Linear(5, 5, bias=False)]),
        LayerChoice({"tanh": nn.Tanh(), "relu": nn.ReLU()}),
        nn.Linear(5, 1),
    )


def choice_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (LayerChoice, InputChoice))]


# --- search_space -------------------------------------------------------------------------------


def test_search_space_lists_every_label_in_creation_order() -> None:
    assert search_space(cell_space) == {
        "width": [4, 6],
        "op": ["linear", "relu"],
        "skip": [[0], [1]],
    }
    assert search_space(eager_space) == {
        "layer_choice_1": ["0", "1"],
        "layer_choice_2": ["tanh", "relu"],
    }


def test_automatic_labels_are_the_same_in_every_build() -> None:
    first, second = search_space(eager_space), search_space(eager_space)
    assert list(first) == list(second) == ["layer_choice_1", "layer_choice_2"]
    with fixed_arch({"layer_choice_1": "1", "layer_choice_2": "relu"}):
        model = eager_space()
    assert model[1].bias is None and isinstance(model[2], nn.ReLU)


def test_input_choice_options_are_sorted_index_lists() -> None:
    assert search_space(lambda: InputChoice(4, 2, label="pick")) == {
        "pick": [[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]]
    }


def test_search_space_errors() -> None:
    with pytest.raises(TypeError, match=r"space must be a function that builds a model\. Received: space=Sequential\("):
        search_space(eager_space())
    with pytest.raises(ValueError, match=r"The space builds no choice\. Received: space=.*Use LayerChoice"):
        search_space(lambda: nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"The space must return an nn\.Module\. Received: it returned 3"):
        search_space(lambda: 3)
    with pytest.raises(RuntimeError, match=r"ValueChoice 'width' can only be used while a multi-trial search"):
        _build_space(cell_space)


# --- fixed_arch ---------------------------------------------------------------------------------


def test_fixed_arch_builds_the_plain_model_bit_identical_to_the_hand_built_one() -> None:
    arch = {"width": 6, "op": "linear", "skip": [1]}
    torch.manual_seed(0)
    with fixed_arch(arch):
        model = cell_space()
    assert choice_modules(model) == []

    torch.manual_seed(0)  # the same model written by hand: only the chosen candidates are built
    first, op, same_op, last = nn.Linear(3, 6), nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 1)
    assert_same_weights(model[0], first)
    assert_same_weights(model[1].op, op)  # one label is one decision; each choice builds its own module
    assert_same_weights(model[1].same_op, same_op)
    assert_same_weights(model[2], last)

    x = torch.randn(2, 3)
    a = op(first(x))
    assert torch.equal(model(x), last(same_op(a)))  # skip [1]: the second input only


def test_module_candidates_draw_from_the_generator_in_the_order_the_caller_builds_them() -> None:
    torch.manual_seed(0)
    with fixed_arch({"layer_choice_1": "1", "layer_choice_2": "tanh"}):
        model = eager_space()
    assert choice_modules(model) == []
    torch.manual_seed(0)
    first, _, second, tanh, _, last = (
        nn.Linear(3, 5), nn.Linear(5, 5), nn.Linear(5, 5, bias=False), nn.Tanh(), nn.ReLU(), nn.Linear(5, 1)
    )
    assert_same_weights(model, nn.Sequential(first, second, tanh, last))


def test_unchosen_factories_do_not_draw_but_their_choices_are_still_checked() -> None:
    def space() -> nn.Module:
        return LayerChoice(
            {
                "deep": lambda: nn.Sequential(nn.Linear(2, 2), LayerChoice([nn.ReLU(), nn.Tanh()], label="act")),
                "shallow": lambda: nn.Linear(2, 2),
            },
            label="depth",
        )

    assert search_space(space) == {"depth": ["deep", "shallow"], "act": ["0", "1"]}
    torch.manual_seed(0)
    with fixed_arch({"depth": "shallow", "act": "1"}):
        model = space()
    after = torch.rand(1)
    torch.manual_seed(0)
    by_hand = nn.Linear(2, 2)
    assert_same_weights(model, by_hand)
    assert torch.equal(after, torch.rand(1))  # the generator is where the plain build leaves it
    with pytest.raises(ValueError, match=r"no entry for the LayerChoice labelled 'act'"):
        with fixed_arch({"depth": "shallow"}):
            space()


def test_shared_label_is_one_decision() -> None:
    def space() -> nn.Module:
        return nn.Sequential(LayerChoice([nn.ReLU(), nn.Tanh()], label="act"), LayerChoice([nn.ReLU(), nn.Tanh()], label="act"))

    assert search_space(space) == {"act": ["0", "1"]}
    with fixed_arch({"act": "1"}):
        model = space()
    assert [type(m) for m in model] == [nn.Tanh, nn.Tanh]
    assert search_space(cell_space)["op"] == ["linear", "relu"]
    with fixed_arch({"width": 4, "op": "relu", "skip": [0]}):
        model = cell_space()
    assert isinstance(model[1].op, nn.ReLU) and isinstance(model[1].same_op, nn.ReLU)


def test_shared_label_with_other_options_is_an_error() -> None:
    def space() -> nn.Module:
        return nn.Sequential(LayerChoice([nn.ReLU(), nn.Tanh()], label="act"), LayerChoice({"a": nn.ReLU()}, label="act"))

    message = r"Choices sharing label 'act' must offer the same options: the first is a LayerChoice with \['0', '1'\]"
    with pytest.raises(ValueError, match=message):
        search_space(space)
    with pytest.raises(ValueError, match=r"the first is a ValueChoice with \[1, 2\], this one a InputChoice"):
        search_space(lambda: (ValueChoice([1, 2], label="x"), InputChoice(2, label="x"))[1])


def test_value_choice_returns_the_value_itself() -> None:
    with fixed_arch({"width": 4, "op": "relu", "skip": [1]}):
        model = cell_space()
    assert model[0].out_features == 4 and type(model[0].out_features) is int
    with fixed_arch({"mode": "b", "on": True, "rate": 0.5}):
        values = ValueChoice(["a", "b"], label="mode"), ValueChoice([False, True], label="on"), ValueChoice([0.1, 0.5], label="rate")
    assert values == ("b", True, 0.5)


def test_fixed_arch_reads_the_json_file_an_experiment_writes(tmp_path) -> None:
    path = tmp_path / "best_arch.json"
    path.write_text(json.dumps({"width": 6, "op": "relu", "skip": [0]}))
    for arch in (path, str(path)):
        with fixed_arch(arch):
            model = cell_space()
        assert model[0].out_features == 6 and isinstance(model[1].op, nn.ReLU)
        assert model[1].skip.chosen == [0]


def test_fixed_arch_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match=r"no entry for the ValueChoice labelled 'width'\. Received: arch labels=\['op'\]\. Add 'width': one of \[4, 6\]"):
        with fixed_arch({"op": "relu"}):
            cell_space()
    with pytest.raises(ValueError, match=r"'gelu' is not an option of the LayerChoice labelled 'op'\. Received: arch\['op'\]='gelu'\. Expected one of \['linear', 'relu'\]"):
        with fixed_arch({"width": 4, "op": "gelu", "skip": [0]}):
            cell_space()
    with pytest.raises(ValueError, match=r"\[0, 1\] is not an option of the InputChoice labelled 'skip'.*Expected one of \[\[0\], \[1\]\]"):
        with fixed_arch({"width": 4, "op": "relu", "skip": [0, 1]}):
            cell_space()
    with pytest.raises(ValueError, match=r"4\.0 is not an option of the ValueChoice labelled 'width'"):
        with fixed_arch({"width": 4.0, "op": "relu", "skip": [0]}):
            cell_space()
    with pytest.raises(ValueError, match=r"labels the space never built: \['depth'\]\. .*The space's labels are \['width', 'op', 'skip'\]"):
        with fixed_arch({"width": 4, "op": "relu", "skip": [0], "depth": 2}):
            cell_space()
    with pytest.raises(TypeError, match=r"arch must be a dict \{label: option\} or the path of a JSON file of one\. Received: arch=\[1\]"):
        fixed_arch([1])
    with pytest.raises(TypeError, match=r"the labels of arch must be str\. Received: label=1"):
        fixed_arch({1: "a"})
    with pytest.raises(ValueError, match=r"no architecture file at .*missing\.json"):
        fixed_arch(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json' is not valid JSON"):
        fixed_arch(tmp_path / "bad.json")


# --- the choice modules -------------------------------------------------------------------------


def test_layer_choice_holds_its_candidates_as_named_children() -> None:
    relu, tanh = nn.ReLU(), nn.Tanh()
    choice = LayerChoice({"relu": relu, "tanh": tanh}, label="act")
    assert choice.label == choice.key == "act"
    assert choice.names == ["relu", "tanh"] and len(choice) == 2
    assert list(choice.named_children()) == [("relu", relu), ("tanh", tanh)]
    assert choice["tanh"] is tanh and choice[0] is relu
    assert LayerChoice([relu, tanh]).names == ["0", "1"]
    with pytest.raises(KeyError, match=r"LayerChoice 'act' has no option 'gelu'; its options are \['relu', 'tanh'\]"):
        choice["gelu"]


def test_choice_modules_copy_and_pickle_also_inside_fixed_arch() -> None:
    choice = LayerChoice({"relu": nn.ReLU(), "linear": nn.Linear(2, 2)}, label="act")
    pick = InputChoice(3, 2, reduction="mean", label="skip")
    with fixed_arch({"act": "linear", "skip": [0, 1]}):  # copies are rebuilt, not resolved
        copies = [copy.deepcopy(choice), pickle.loads(pickle.dumps(choice))]
        picks = [copy.deepcopy(pick), pickle.loads(pickle.dumps(pick))]
    for copied in copies:
        assert isinstance(copied, LayerChoice) and copied.label == "act" and copied.names == ["relu", "linear"]
        assert_same_weights(copied, choice)
    for copied in picks:
        assert isinstance(copied, InputChoice) and (copied.label, copied.options) == ("skip", pick.options)


def test_a_choice_module_given_as_the_chosen_candidate_is_returned_as_it_is() -> None:
    inner = LayerChoice([nn.ReLU(), nn.Tanh()], label="inner")  # built by hand, outside any build
    with fixed_arch({"outer": "0"}):
        chosen = LayerChoice([inner, nn.Identity()], label="outer")
    assert chosen is inner and chosen.label == "inner" and chosen.names == ["0", "1"]


def test_choices_without_an_architecture_refuse_to_run() -> None:
    expected = r"Choose an architecture first: build the space under `with fixed_arch\(arch\):`, search it with an `Experiment`, or train it with a one-shot trainer"
    with pytest.raises(RuntimeError, match=r"LayerChoice 'act' has no chosen candidate\. " + expected):
        LayerChoice([nn.ReLU()], label="act")(torch.ones(1))
    with pytest.raises(RuntimeError, match=r"InputChoice 'skip' has no chosen inputs\. " + expected):
        InputChoice(2, label="skip")([torch.ones(1), torch.ones(1)])
    with pytest.raises(RuntimeError, match=r"ValueChoice 'w' can only be used while a multi-trial search builds the space.*One-shot trainers cannot use ValueChoice"):
        ValueChoice([1, 2], label="w")


def test_choice_argument_errors() -> None:
    with pytest.raises(TypeError, match=r"candidates must be a list or a dict of modules\. Received: candidates=ReLU\(\) of type ReLU"):
        LayerChoice(nn.ReLU())
    with pytest.raises(ValueError, match=r"candidates must not be empty\. Received: candidates=\[\]"):
        LayerChoice([])
    with pytest.raises(TypeError, match=r"candidate '1' must be an nn\.Module \(or a zero-argument callable that builds one\)\. Received: 3 of type int"):
        LayerChoice([nn.ReLU(), 3])
    with pytest.raises(TypeError, match=r"the callable for candidate '0' must return an nn\.Module\. Received: it returned 3"):
        LayerChoice([lambda: 3])
    with pytest.raises(ValueError, match=r"non-empty str without '\.'\. Received: key='a\.b'"):
        LayerChoice({"a.b": nn.ReLU()})
    with pytest.raises(TypeError, match=r"LayerChoice: label must be a non-empty str \(or None for an automatic label\)\. Received: label=''"):
        LayerChoice([nn.ReLU()], label="")
    with pytest.raises(ValueError, match=r"InputChoice: n_candidates must be an int >= 1\. Received: n_candidates=0"):
        InputChoice(0)
    with pytest.raises(ValueError, match=r"InputChoice: n_chosen must be an int >= 1\. Received: n_chosen=0"):
        InputChoice(2, 0)
    with pytest.raises(ValueError, match=r"n_chosen must be at most n_candidates\. Received: n_chosen=3, n_candidates=2"):
        InputChoice(2, 3)
    with pytest.raises(ValueError, match=r"reduction must be one of \('sum', 'mean', 'concat', 'none'\)\. Received: reduction='max'"):
        InputChoice(2, reduction="max")
    with pytest.raises(ValueError, match=r"ValueChoice: values must be a non-empty list\. Received: values=\[\]"):
        ValueChoice([], label="w")
    with pytest.raises(TypeError, match=r"each value must be an int, float, str or bool.*Received: ReLU\(\) of type ReLU"):
        ValueChoice([nn.ReLU()], label="w")
    with pytest.raises(ValueError, match=r"ValueChoice: values must be distinct\. Received: values=\[1, 1\]"):
        ValueChoice([1, 1], label="w")
    with pytest.raises(ValueError, match=r'ValueChoice: label is required\. Received: label=None\. Name the decision, e.g\. label="hidden"'):
        ValueChoice([1, 2])


@pytest.mark.parametrize(
    ("reduction", "chosen", "expected"),
    [
        ("sum", [0, 2], [[4.0, 6.0]]),
        ("mean", [0, 2], [[2.0, 3.0]]),
        ("concat", [0, 2], [[1.0, 2.0, 3.0, 4.0]]),
        ("sum", [1], [[10.0, 20.0]]),
    ],
)
def test_input_choice_reductions(reduction: str, chosen: list[int], expected: list) -> None:
    inputs = [torch.tensor([[1.0, 2.0]]), torch.tensor([[10.0, 20.0]]), torch.tensor([[3.0, 4.0]])]
    with fixed_arch({"pick": chosen}):
        pick = InputChoice(3, len(chosen), reduction=reduction, label="pick")
    assert isinstance(pick, ChosenInputs)
    assert torch.equal(pick(inputs), torch.tensor(expected))


def test_input_choice_none_returns_the_chosen_tensors() -> None:
    inputs = [torch.zeros(1), torch.ones(1), torch.full((1,), 2.0)]
    with fixed_arch({"pick": [1, 2]}):
        pick = InputChoice(3, 2, reduction="none", label="pick")
    out = pick(inputs)
    assert isinstance(out, list) and len(out) == 2 and out[0] is inputs[1] and out[1] is inputs[2]


# --- replacing the choices (one-shot trainers) -------------------------------------------------


class DartsLayerChoice(nn.Module):  # seed 002, verbatim
    def __init__(self, layer_choice):
        super(DartsLayerChoice, self).__init__()
        self.name = layer_choice.key
        self.op_choices = nn.ModuleDict(layer_choice.named_children())
        self.alpha = nn.Parameter(torch.randn(len(self.op_choices)) * 1e-3)

    def forward(self, *args, **kwargs):
        op_results = torch.stack([op(*args, **kwargs) for op in self.op_choices.values()])
        alpha_shape = [-1] + [1] * (len(op_results.size()) - 1)
        return torch.sum(op_results * F.softmax(self.alpha, -1).view(*alpha_shape), 0)


def test_seed_darts_layer_choice_runs_through_replace_layer_choice() -> None:
    torch.manual_seed(0)
    model, space = _build_space(eager_space)  # as a one-shot trainer builds it: the choices stay modules
    assert space == search_space(eager_space)
    linear, no_bias = model[1]["0"], model[1]["1"]
    nas_modules: list = []
    returned = replace_layer_choice(model, DartsLayerChoice, nas_modules)
    assert returned == nas_modules
    assert [label for label, _ in nas_modules] == ["layer_choice_1", "layer_choice_2"]
    assert nas_modules[0][1] is model[1] and nas_modules[1][1] is model[2]
    assert choice_modules(model) == []
    assert model[1].name == "layer_choice_1" and model[1].op_choices["0"] is linear

    x = torch.randn(3, 3)
    h = model[0](x)
    w1 = F.softmax(model[1].alpha, -1)
    h = w1[0] * linear(h) + w1[1] * no_bias(h)
    w2 = F.softmax(model[2].alpha, -1)
    h = w2[0] * torch.tanh(h) + w2[1] * torch.relu(h)
    torch.testing.assert_close(model(x), model[3](h), rtol=1e-6, atol=1e-7)


def test_replace_keeps_a_shared_choice_shared_and_replaces_nested_ones_first() -> None:
    shared = LayerChoice([nn.ReLU(), nn.Tanh()], label="act")
    outer = LayerChoice([nn.Sequential(nn.Linear(2, 2), LayerChoice([nn.ReLU()], label="inner")), nn.Identity()], label="outer")
    model = nn.ModuleDict({"a": shared, "b": shared, "c": outer})
    seen = []

    def factory(choice: LayerChoice) -> nn.Module:
        seen.append((choice.label, [type(m).__name__ for m in choice.modules()]))
        return DartsLayerChoice(choice)

    replaced = replace_layer_choice(model, factory)
    assert [label for label, _ in replaced] == ["act", "inner", "outer"]
    assert model["a"] is model["b"]
    assert "LayerChoice" not in seen[2][1][1:]  # the outer factory saw the inner choice replaced


def test_replace_input_choice_extends_modules() -> None:
    model = nn.ModuleList([nn.Linear(2, 2), InputChoice(3, 2, reduction="mean", label="skip")])
    modules = [("earlier", nn.Identity())]
    returned = replace_input_choice(model, lambda choice: ChosenInputs(choice.options[0], choice.reduction), modules)
    assert [label for label, _ in modules] == ["earlier", "skip"] and returned == modules[1:]
    assert model[1]([torch.ones(1), torch.full((1,), 3.0), torch.zeros(1)]).item() == 2.0


def test_replace_errors() -> None:
    model = nn.Sequential(LayerChoice([nn.ReLU()], label="act"))
    with pytest.raises(TypeError, match=r"replace_layer_choice: model must be an nn\.Module\. Received: model=3 of type int"):
        replace_layer_choice(3, DartsLayerChoice)
    with pytest.raises(TypeError, match=r"replace_layer_choice: factory must be callable \(choice -> nn\.Module\)\. Received: factory=None"):
        replace_layer_choice(model, None)
    with pytest.raises(TypeError, match=r"replace_input_choice: modules must be a list \(or None\)\. Received: modules=\(\)"):
        replace_input_choice(model, DartsLayerChoice, ())
    with pytest.raises(TypeError, match=r"factory must return an nn\.Module\. Received: factory\('act'\) returned 'x' of type str"):
        replace_layer_choice(model, lambda choice: "x")
