"""`python -m moegen.lm_eval ARGS` = `moegen lm-eval ARGS`."""
import sys

from moegen.cli.lm_eval import launch

launch(sys.argv[1:])
