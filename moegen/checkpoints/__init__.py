"""Making and identifying checkpoints: `fixture` (small test checkpoints, random or upcycled from a
trained dense model by `upcycle`), `quantize` (fp8 / GPTQ copies of a checkpoint) and
`fingerprints` (the cheap identity every cache and journal is keyed by)."""
