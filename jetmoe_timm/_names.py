""" Text for error messages: "did you mean" (the closest of the names a misspelled one was meant to be), and
another library's error quoted in one short line. """
import difflib
import textwrap
from typing import Optional, Sequence

__all__ = ['closest_name', 'did_you_mean', 'quoted']


def quoted(e: BaseException, width: int = 120) -> str:
    """The first line of ``e``'s message, cut at a word boundary ('...') past ``width`` characters."""
    lines = str(e).strip().splitlines()
    return textwrap.shorten(lines[0], width, placeholder=' ...') if lines else ''


def closest_name(word: str, choices: Sequence[str], cutoff: float = 0.6) -> Optional[str]:
    """The one of ``choices`` closest to ``word``, None where none is close (difflib's ratio below ``cutoff``)."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(word: str, choices: Sequence[str], cutoff: float = 0.6) -> str:
    """" (did you mean 'X'?)" for the closest of ``choices`` to ``word``, '' where none is close."""
    close = closest_name(word, choices, cutoff)
    return f" (did you mean '{close}'?)" if close else ''
