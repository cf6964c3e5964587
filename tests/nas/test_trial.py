"""report_intermediate_result / report_final_result: routed inside a trial, logged outside one."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from trainflow.nas import report_final_result, report_intermediate_result
from trainflow.nas.trial import _reporting


class Recorder:
    def __init__(self) -> None:
        self.seen: list[tuple[str, object]] = []

    def intermediate(self, value):
        self.seen.append(("intermediate", value))

    def final(self, value):
        self.seen.append(("final", value))


def test_reports_go_to_the_reporter_in_order():
    rec = Recorder()
    with _reporting(rec):
        report_intermediate_result(1)
        report_intermediate_result(torch.tensor(0.5))
        report_intermediate_result(np.float32(0.25))
        report_final_result({"accuracy": 0.75, "params": 10})
    assert rec.seen == [
        ("intermediate", 1.0),
        ("intermediate", 0.5),
        ("intermediate", 0.25),
        ("final", {"accuracy": 0.75, "params": 10.0}),
    ]
    assert all(type(v) is float for _, v in rec.seen[:3])


def test_nested_reporting_goes_to_the_innermost_and_restores_on_exit_and_on_error(caplog):
    outer, inner = Recorder(), Recorder()
    with _reporting(outer):
        with pytest.raises(RuntimeError, match="boom"):
            with _reporting(inner):
                report_final_result(2.0)
                raise RuntimeError("boom")
        report_final_result(3.0)
    assert inner.seen == [("final", 2.0)]
    assert outer.seen == [("final", 3.0)]
    with caplog.at_level(logging.INFO, logger="trainflow.nas"):
        report_final_result(4.0)
    assert outer.seen == [("final", 3.0)]  # the routing ended with the block
    assert [r.getMessage() for r in caplog.records] == ["final result: 4.0"]


def test_outside_an_experiment_reports_are_logged(caplog):
    with caplog.at_level(logging.INFO, logger="trainflow.nas"):
        report_intermediate_result(0.5)
        report_final_result({"accuracy": 0.9})
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        ("trainflow.nas", logging.INFO, "intermediate result: 0.5"),
        ("trainflow.nas", logging.INFO, "final result: {'accuracy': 0.9}"),
    ]


@pytest.mark.parametrize(
    "value, error, match",
    [
        ("0.5", TypeError, r"report_final_result: value must be a number or a dict of numbers\. Received: '0\.5'"),
        (True, TypeError, r"Received: True of type bool"),
        (torch.ones(2), TypeError, r"Received: tensor\(\[1\., 1\.\]\) of type Tensor\. Report a float"),
        (float("nan"), ValueError, r"value must not be NaN\. Received: nan"),
        ({}, ValueError, r"non-empty dict of numbers\. Received: value=\{\}"),
        ({1: 0.5}, TypeError, r"keys of a dict value must be metric names \(str\)\. Received: key=1"),
        ({"acc": None}, TypeError, r"value\['acc'\] must be a number .* Received: None of type NoneType"),
    ],
)
def test_bad_values_raise_naming_the_value(value, error, match):
    rec = Recorder()
    with _reporting(rec):
        with pytest.raises(error, match=match):
            report_final_result(value)
    assert rec.seen == []


def test_intermediate_error_names_its_function():
    with pytest.raises(TypeError, match=r"report_intermediate_result: value must be a number"):
        report_intermediate_result([0.5])


def test_reporter_without_methods_is_rejected():
    with pytest.raises(TypeError, match=r"reporter must have \.intermediate\(value\) and \.final\(value\) methods\. Received: reporter=42"):
        with _reporting(42):
            pass
