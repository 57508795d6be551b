"""The ``hf-gam`` command line: ``hf-gam train`` (:mod:`~hf_gam.cli.train`) and ``hf-gam flatness``
(:mod:`~hf_gam.cli.flatness`), their shared helpers (:mod:`~hf_gam.cli.common`: config files, user errors, the
process group) and model loading (:mod:`~hf_gam.cli.models`).

User errors (bad flags, unknown datasets, missing columns, unreadable models, a push that cannot succeed) are
printed as one ``hf-gam: error: ...`` line with exit status 2, before anything is computed or written. A push to
the Hub that fails after training succeeded is one such line with exit status 3, naming the saved output folder,
the repo and the ``hf upload`` command that pushes it later (:mod:`~hf_gam.cli.push`).
"""

from __future__ import annotations

import logging
import sys

from ..errors import HubPushError, UserError
from .common import end_process_group, exit_process
from .flatness import flatness_main
from .train import train_main

__all__ = ["main", "console_main"]

USAGE = """usage: hf-gam <command> [options]

commands:
  train      fine-tune / train an image classifier with GAM (no options: GAM on sklearn's digits)
  flatness   flatness diagnostics of a trained model (Hessian spectrum, R0/R1, landscape)

'hf-gam <command> --help' lists a command's options."""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``hf-gam`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    commands = {"train": train_main, "flatness": flatness_main}
    if command not in commands:
        print(f"{USAGE}\n\nhf-gam: error: unknown command {command!r}; choose from {', '.join(commands)}",
              file=sys.stderr)
        return 2
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    try:
        status = commands[command](rest)
    except UserError as err:  # every user error of every floor, one line, exit status 2
        print(f"hf-gam: error: {err}", file=sys.stderr)
        status = 2
    except HubPushError as err:  # training succeeded, the push did not: the line says how to push it later
        print(f"hf-gam: error: {err}", file=sys.stderr)
        status = 3
    except SystemExit as exit_:  # argparse: --help (0) or a bad flag (2, message already printed)
        status = exit_.code if isinstance(exit_.code, int) else 2
    except BaseException:
        end_process_group(wait=False)  # the other processes may be inside a collective: do not wait for them
        raise
    end_process_group(wait=True)
    return status


def console_main() -> None:
    """The ``hf-gam`` console script: :func:`main`, then :func:`~hf_gam.cli.common.exit_process`."""
    exit_process(main())
