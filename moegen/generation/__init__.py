"""Bulk generation: a file or dataset of prompts through the engine (or its Ray replicas) into a
durable, resumable JSONL journal. `job` is the one pipeline every caller runs (`moegen generate`,
the Prefect `generate` flow, OpenAI batch files); `prompts` reads inputs, `journal` (+
`output_lock`) keeps the rows under a `fingerprint` of what made them, `replicas` runs N engines on Ray, `openai_batch` speaks the
OpenAI Batch API's rows."""
