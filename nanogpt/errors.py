"""
The one exception type for mistakes made at the keyboard: a bad flag, a missing file, a
checkpoint that is not one. Every script's `configurator.run(main)` prints it as one line,
`error: ...`, and exits with code 2, without a traceback.
"""


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2. A message that quotes
    another library's words (which may run over lines) is joined into one line here."""

    def __init__(self, message):
        super().__init__(" ".join(str(message).splitlines()))
