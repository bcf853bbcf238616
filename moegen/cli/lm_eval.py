"""`moegen lm-eval ARGS`: lm-eval's own command line with the moegen model and local tasks; every
argument goes to the launcher (moegen.eval.launcher) untouched."""
import argparse


def cmd_lm_eval(args) -> None:
    from moegen.eval.launcher import launch
    launch(args.lm_eval_args)


def add_subparser(sub):
    # no options of its own (not even -h): every argument goes to lm-eval untouched
    p = sub.add_parser("lm-eval", help="lm-eval's own CLI with the moegen model and local tasks "
                       "(`moegen lm-eval --help` shows lm-eval's help)", add_help=False, prefix_chars="\0")
    p.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_lm_eval)
