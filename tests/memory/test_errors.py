"""The error hierarchy: transient or rejected, importable where it always was."""

import pytest

from memory.embedding import EmbedderError
from memory.errors import (
    TRANSIENT,
    InvalidImport,
    MemoryLibraryError,
    RejectedError,
    TransientError,
)
from memory.extraction import ExtractionError, ExtractionUnavailable
from memory.models import InvalidScope


@pytest.mark.parametrize("error", [EmbedderError, ExtractionUnavailable, OSError])
def test_what_passes_is_transient(error):
    assert issubclass(error, TRANSIENT)


@pytest.mark.parametrize("error", [InvalidScope, InvalidImport, ExtractionError, ValueError])
def test_what_is_wrong_or_may_be_is_not_transient(error):
    assert not issubclass(error, TRANSIENT)


def test_rejections_keep_their_builtin_bases():
    assert issubclass(InvalidScope, RejectedError)
    assert issubclass(InvalidScope, ValueError)
    assert issubclass(InvalidImport, RejectedError)
    assert issubclass(InvalidImport, ValueError)
    assert issubclass(EmbedderError, RuntimeError)


def test_every_error_has_the_librarys_base():
    for error in (
        EmbedderError,
        ExtractionError,
        ExtractionUnavailable,
        InvalidScope,
        InvalidImport,
    ):
        assert issubclass(error, MemoryLibraryError)
    assert issubclass(ExtractionUnavailable, TransientError)
    assert issubclass(ExtractionUnavailable, ExtractionError)
