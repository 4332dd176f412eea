"""Which errors the command line prints as one ``Error:`` line, and which keep their traceback.

User errors: :class:`UserError`; ``ValueError``, ``RuntimeError`` and ``KeyError`` that this
package raises on purpose (a ``raise`` statement in its own code, so the message was written for
the user); file-system errors (missing file, no permission, disk full). Anything else is a bug.
"""

from __future__ import annotations

import dis
from pathlib import Path

#: The engine package (COLIPRISlicerLib), whose ``raise`` statements speak to the user.
PACKAGE_DIR = Path(__file__).resolve().parent.parent


class UserError(Exception):
    """An error the user can fix; printed as one line, exit code 1."""


def user_error_message(error: BaseException) -> str | None:
    """The one-line message of a user error, or None for a bug (see the module docstring)."""
    if isinstance(error, UserError):
        return str(error)
    if isinstance(error, OSError) and error.strerror:
        where = f' "{error.filename}"' if error.filename else ""
        return f"{error.strerror}:{where}. Check the path, its permissions and the free disk space."
    if isinstance(error, (ValueError, RuntimeError, KeyError, FileNotFoundError)) and _raised_here(error):
        text = error.args[0] if isinstance(error, KeyError) and error.args else error
        return " ".join(str(text).split())
    return None


def _raised_here(error: BaseException) -> bool:
    """Whether ``error`` comes from a ``raise`` statement of this package (its innermost frame is in
    this package and stopped at a raise instruction: read from the bytecode, not the source file)."""
    tb = error.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    in_package = str(Path(code.co_filename).resolve()).startswith(str(PACKAGE_DIR))
    return in_package and dis.opname[code.co_code[tb.tb_lasti]] in ("RAISE_VARARGS", "RERAISE")
