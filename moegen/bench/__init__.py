"""Benchmarking: `run` (one workload on one system, the JSON a bench writes), `systems/` (one file
per system under test: moegen, transformers, vLLM, llama.cpp, ...), `workloads` (prompt sets),
`metrics` (throughput, S-MFU/S-MBU from a RunRecord), `ratios` (moegen against a baseline),
`peers` (the other systems' own environments) and `peer_runners/` (scripts run by a peer's
python)."""
