"""The algorithm core: pure torch math of RLHF, with a formula and its paper on every function.

- `logprobs`: token and sequence log-probabilities (chunked gather + logsumexp), token
  entropy, the SFT loss.
- `preference`: Bradley–Terry and Plackett–Luce reward-model losses, DPO / IPO / SLiC-HF,
  SimPO, reward accuracy.
- `ppo`: GAE, whitening, KL estimators and controllers, reward shaping, clipped policy and
  value losses, GRPO / RLOO group advantages.
- `options`: the names of the variants above (loss types, KL estimators, advantage
  estimators), importable without torch, for validating params.

No I/O, no models, no settings: nothing here imports rlhf_core outside this package, so the
trainers compose these functions and never the other way round. Import from the modules
(`from rlhf_core.algorithms.preference import dpo_loss`); this file exports nothing.
"""
