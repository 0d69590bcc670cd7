"""What every command says in one line instead of a traceback.

``BadInput`` is the user's input being wrong: a config key or value (``ConfigError``), a data problem
(``DataError``), a run folder, checkpoint or weights file (``WeightsError``). Its message names the file or key.
Every command exits 2 on it (``multitask.cli.guarded``); the system refusing a file operation (``OSError``)
exits 3. Kept free of heavy imports: the command line imports it before anything else.
"""


class BadInput(Exception):
    """The user's input is wrong; the message names the file or key and says what is wrong."""


class ConfigError(BadInput, ValueError):
    """A config file or override is wrong; the message names it."""
