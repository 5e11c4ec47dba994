""" "Did you mean": the closest of the names a misspelled one was meant to be, for error messages. """
import difflib
from typing import Optional, Sequence

__all__ = ['closest_name', 'did_you_mean']


def closest_name(word: str, choices: Sequence[str], cutoff: float = 0.6) -> Optional[str]:
    """The one of ``choices`` closest to ``word``, None where none is close (difflib's ratio below ``cutoff``)."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=cutoff)
    return close[0] if close else None


def did_you_mean(word: str, choices: Sequence[str], cutoff: float = 0.6) -> str:
    """" (did you mean 'X'?)" for the closest of ``choices`` to ``word``, '' where none is close."""
    close = closest_name(word, choices, cutoff)
    return f" (did you mean '{close}'?)" if close else ''
