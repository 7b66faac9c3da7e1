"""On-policy distillation: the rollout engine, the losses, the trainer and what runs beside it.

Modules: `config` (`TrainConfig`, `SamplingConfig`), `rollout` (student sampling with chunked,
KV-cached teacher scoring and online termination) and `kvcache`, `loss` (top-k + tail, full and
sampled-token reverse KL), `trainer` (the loop), `checkpoint` (trainer state, safe to load),
`distributed` and `fsdp` (several processes), `supervise` (train on chosen phases), `record`
(traces without training), `tracking` (TensorBoard / trackio / wandb), `preflight` (a whole
config checked before any model loads), `plan` (memory per device from two config.json files).

May import: `kat_diag.kat`, `kat_diag.traces`, `kat_diag.data`, `kat_diag.world`, `kat_diag.views`,
`kat_diag.models`, `kat_diag.evaluation`, `kat_diag.run`. Never the analyses or the study.
"""
