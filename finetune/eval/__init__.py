"""Evaluation, base vs adapter: suites (suite.py), examples (prompts.py), scoring (scoring.py), metrics (metrics.py),
cached base scores (cache.py), the report (report.py), and the run that ties them together (evaluate.py)."""

from finetune.eval.evaluate import run
from finetune.eval.report import markdown, regressions, table
from finetune.eval.suite import load_suite, suite_for, suite_names

__all__ = ["run", "table", "markdown", "regressions", "load_suite", "suite_for", "suite_names"]
