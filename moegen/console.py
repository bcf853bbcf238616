"""The rich console every terminal table is printed on."""
from rich.console import Console


def make_console() -> Console:
    """The terminal's width, or a wide one when printing to a file or pipe (rich defaults to 80)."""
    console = Console()
    return console if console.is_terminal else Console(width=220)
