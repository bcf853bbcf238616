"""Offline lm-eval task configs (package data): `gsm8k_local` and `gsm8k_mc_local`.

`moegen.eval.run.run_eval` passes this folder to lm-eval as an include path. The data are read
by `gsm8k_data` at load time (see there for how the GSM8K directory is found).
"""
from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent
LOCAL_TASKS = ("gsm8k_local", "gsm8k_mc_local")
