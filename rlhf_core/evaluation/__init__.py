"""Evaluation of aligned policies: metrics (`metrics`) and the reports built from them (`report`).

Pure functions; the evaluation stage generates and scores responses, then calls these.
Importing this package is cheap: matplotlib and pandas load only when a report needs them.
"""

from rlhf_core.evaluation.metrics import (
    POLICY_SUMMARY_KEYS,
    ConfidenceInterval,
    KLEstimate,
    best_of_n_kl,
    best_of_n_select,
    bootstrap_ci,
    distinct_n,
    kl_from_logprob_sums,
    mean_length,
    mean_token_length,
    summarise_policy,
    win_indicators,
    win_rate,
)
from rlhf_core.evaluation.report import (
    comparison_table_markdown,
    curve_rows,
    curves_figure,
    format_value,
    prompt_text,
    reward_vs_kl_figure,
    samples_markdown,
    samples_table,
    write_curves_csv,
    write_curves_json,
)

__all__ = [
    "POLICY_SUMMARY_KEYS",
    "ConfidenceInterval",
    "KLEstimate",
    "best_of_n_kl",
    "best_of_n_select",
    "bootstrap_ci",
    "comparison_table_markdown",
    "curve_rows",
    "curves_figure",
    "distinct_n",
    "format_value",
    "kl_from_logprob_sums",
    "mean_length",
    "mean_token_length",
    "prompt_text",
    "reward_vs_kl_figure",
    "samples_markdown",
    "samples_table",
    "summarise_policy",
    "win_indicators",
    "win_rate",
    "write_curves_csv",
    "write_curves_json",
]
