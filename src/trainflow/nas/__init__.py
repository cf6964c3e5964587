"""Neural architecture search: search spaces, trainers that report results, multi-trial experiments."""

from trainflow.nas.trial import report_final_result, report_intermediate_result

__all__ = [
    "report_intermediate_result",
    "report_final_result",
]
