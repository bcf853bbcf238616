"""`python -m moegen.lm_eval ARGS` = `moegen lm-eval ARGS`."""
import sys

from moegen.eval.launcher import launch

launch(sys.argv[1:])
