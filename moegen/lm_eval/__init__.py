"""`python -m moegen.lm_eval ARGS`: lm-eval's CLI with the moegen model and tasks (moegen.eval.launcher)."""
