"""The subcommands of the ``fxqat`` command, one module each; :mod:`fxqat.cli` parses the flags and dispatches.

Example:
    >>> from fxqat.commands import cmd_train
    >>> cmd_train.__module__
    'fxqat.commands.train'
"""

from fxqat.commands.autobits import cmd_autobits
from fxqat.commands.inspect import cmd_inspect
from fxqat.commands.run_jobs import cmd_bench, cmd_demo
from fxqat.commands.train import cmd_train

__all__ = ["cmd_autobits", "cmd_bench", "cmd_demo", "cmd_inspect", "cmd_train"]
