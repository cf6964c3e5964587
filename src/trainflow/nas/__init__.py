"""Neural architecture search: search spaces, trainers that report results, multi-trial experiments, one-shot search."""

from trainflow.nas.module import FunctionalTrainer, ModuleTrainer, TrainModule
from trainflow.nas.space import (
    InputChoice,
    LayerChoice,
    ValueChoice,
    fixed_arch,
    replace_input_choice,
    replace_layer_choice,
    search_space,
)
from trainflow.nas.experiment import Experiment, TrialRecord
from trainflow.nas.strategies import TPE, GridSearch, Random, RegularizedEvolution
from trainflow.nas.trial import report_final_result, report_intermediate_result
from trainflow.nas.darts import DartsFlow, DartsTrainer, darts_flow
from trainflow.nas.spos import SinglePathTrainer

__all__ = [
    "InputChoice",
    "LayerChoice",
    "ValueChoice",
    "fixed_arch",
    "replace_input_choice",
    "replace_layer_choice",
    "search_space",
    "FunctionalTrainer",
    "ModuleTrainer",
    "TrainModule",
    "report_intermediate_result",
    "report_final_result",
    "Random",
    "GridSearch",
    "TPE",
    "RegularizedEvolution",
    "Experiment",
    "TrialRecord",
    "DartsTrainer",
    "DartsFlow",
    "darts_flow",
    "SinglePathTrainer",
]
