"""The method: KAT's parameters, its detector, the termination policies, phases and replay.

Modules: `config` (`KATConfig`, the paper's and the world's presets; no torch), `detector` (the
exact, vectorised rule: window means, the FIFO threshold buffer, `StreamingDetector`), `policies`
(`none`, `kat`, `random`, `prefix`, `kat+prefix` behind one interface, `make_policy`), `replay`
(the detector over ragged recorded KL, bit-identical to online), `phases` (pre-agreement /
agreement / post-agreement segmentation with hindsight).

May import: `kat_diag.traces` (a `random` policy length-matched to a KAT run reads that run's
store) and nothing else of kat_diag. The trainer, the analyses and the integrations build on it.
"""
