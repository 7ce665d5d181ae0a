"""Evaluation of aligned policies: metrics (`metrics`), the reports built from them
(`report`, `comparison_report`), the policy comparison (`comparison`) and head-to-head games
(`head_to_head`).

Pure functions; the evaluation stage generates and scores responses, then calls these.
Import the modules themselves: matplotlib and pandas load only when a report needs them.
"""
