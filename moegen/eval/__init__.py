"""Evaluation through lm-eval: `lm_eval_backend` is the lm-eval model `moegen` (every engine call of
lm-eval's three request types), `run` runs tasks on moegen or transformers, `tasks/` holds the
offline task configs (GSM8K from a local copy), `launcher` runs lm-eval's own CLI with all of it
(`moegen lm-eval`, `python -m moegen.lm_eval`)."""
