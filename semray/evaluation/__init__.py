"""Evaluation framework: every method x every metric x every noise level, figures, report, MLflow.

Modules, one concern each:

* :mod:`~semray.evaluation.testset`: the fixed test images and the seeded noise conditions (pure);
* :mod:`~semray.evaluation.methods`: classical denoisers and models behind one runner interface, timing;
* :mod:`~semray.evaluation.stats`: summaries with confidence intervals, paired deltas (pure pandas);
* :mod:`~semray.evaluation.detection`: defect detection with false alarms counted (ROC, AUC, recall at a
  fixed false-alarm rate, cluster-bootstrap CIs; pure);
* :mod:`~semray.evaluation.detectability`: the ideal observer, the bound on detection (analytic and
  Monte Carlo; pure);
* :mod:`~semray.evaluation.figures`, :mod:`~semray.evaluation.content`, :mod:`~semray.evaluation.report`:
  the PNG figures, what the report says, and its Markdown/HTML writers;
* :mod:`~semray.evaluation.result`: an evaluation's tables, its file names, reading a folder back;
* :mod:`~semray.evaluation.tracking`: one MLflow run per evaluation;
* :mod:`~semray.evaluation.runner`: the job that ties them together (:func:`run_evaluation`);
* :mod:`~semray.evaluation.ablation`: the write-up's ablation (train variants, then evaluate them).
"""

from semray.evaluation.result import EvaluationResult, load_evaluation
from semray.evaluation.runner import evaluate_methods, run_evaluation

__all__ = ["EvaluationResult", "evaluate_methods", "load_evaluation", "run_evaluation"]
