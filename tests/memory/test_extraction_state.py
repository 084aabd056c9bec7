"""The extractor's memory of its endpoint: the modes that worked, the model in use."""

import json
import logging

import pytest

from memory.extraction_state import ExtractionState, read_state
from memory.redaction import public_url

URL = "http://127.0.0.1:8080/v1"
GGUF = "/models/SmolLM2-135M-Instruct-Q8_0.gguf"


@pytest.fixture
def path(tmp_path):
    return tmp_path / "data" / "extraction-state.json"


async def test_what_was_learned_is_there_after_a_restart(path):
    state = ExtractionState(path)
    state.set_mode(URL, GGUF, "json_object")
    state.set_mode("https://api.openai.com/v1", "gpt-4o-mini", "json_schema")
    state.use(URL, GGUF)
    await state.save()

    again = ExtractionState(path)
    assert again.mode(URL, GGUF) == "json_object"
    assert again.mode("https://api.openai.com/v1", "gpt-4o-mini") == "json_schema"
    assert again.mode(URL, "another-model") is None
    assert (again.endpoint, again.model) == (URL, GGUF)


async def test_the_file_is_what_a_stats_page_in_another_process_reads(path):
    state = ExtractionState(path)
    state.use(URL, GGUF)
    state.set_mode("https://elsewhere.test/v1", GGUF, "json_schema")
    assert read_state(path) is None  # nothing saved yet
    await state.save()
    saved = read_state(path)
    assert saved is not None
    assert (saved.endpoint, saved.model, saved.mode, saved.modes) == (URL, GGUF, None, {})
    state.set_mode(URL, GGUF, "text")
    state.set_mode(URL, "other-model", "json_object")
    await state.save()
    saved = read_state(path)
    assert saved is not None
    assert saved.mode == "text"
    # The modes of its endpoint, by model.
    assert saved.modes == {GGUF: "text", "other-model": "json_object"}
    assert saved.updated_at is not None


def test_set_mode_says_what_it_replaced(path):
    state = ExtractionState(path)
    assert state.set_mode(URL, GGUF, "json_schema") is None
    assert state.set_mode(URL, GGUF, "json_schema") == "json_schema"
    assert state.set_mode(URL, GGUF, "json_object") == "json_schema"


async def test_nothing_is_written_unless_something_changed(path):
    state = ExtractionState(path)
    await state.save()
    assert not path.exists()
    state.set_mode(URL, GGUF, "json_object")
    await state.save()
    path.unlink()
    state.set_mode(URL, GGUF, "json_object")
    state.use(URL, GGUF)
    state.use(URL, GGUF)
    await state.save()  # only `use` changed something
    assert read_state(path) is not None
    path.unlink()
    state.use(URL, GGUF)
    await state.save()
    assert not path.exists()


async def test_the_file_is_replaced_whole_and_no_temporary_file_is_left(path):
    state = ExtractionState(path)
    for mode in ("json_schema", "json_object", "text"):
        state.set_mode(URL, GGUF, mode)
        await state.save()
    assert [p.name for p in path.parent.iterdir()] == [path.name]
    assert json.loads(path.read_text())["version"] == 1


async def test_concurrent_saves_end_with_the_latest_state(path):
    import asyncio

    state = ExtractionState(path)
    saves = []
    for mode in ("json_schema", "json_object", "text"):
        state.set_mode(URL, GGUF, mode)
        saves.append(state.save())
    await asyncio.gather(*saves)
    assert ExtractionState(path).mode(URL, GGUF) == "text"


@pytest.mark.parametrize(
    "content",
    [
        "",
        '{"endpoint": "http://127.0.0.1:8080/v1", "mod',
        "[1, 2]",
        '{"endpoint": 42}',
        '{"modes": "json_object"}',
        b"\xff\xfe not utf-8",
    ],
)
def test_a_corrupt_file_is_started_afresh_with_a_warning(path, caplog, content):
    path.parent.mkdir(parents=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with caplog.at_level(logging.WARNING, logger="memory.extraction"):
        state = ExtractionState(path)
    assert (state.endpoint, state.model, state.mode(URL, GGUF)) == (None, None, None)
    assert "starting afresh" in caplog.text
    assert read_state(path) is None


def test_a_missing_file_is_a_first_start_not_a_problem(path, caplog):
    with caplog.at_level(logging.WARNING, logger="memory.extraction"):
        state = ExtractionState(path)
    assert state.endpoint is None
    assert caplog.text == ""


def test_entries_a_newer_version_wrote_are_skipped_not_fatal(path):
    path.parent.mkdir(parents=True)
    entries = [
        {"endpoint": URL, "model": GGUF, "mode": "json_object", "learned_at": 1.0},
        {"endpoint": URL, "model": "other", "mode": "tool_calls"},
        "something else",
    ]
    path.write_text(json.dumps({"version": 2, "endpoint": URL, "model": GGUF, "modes": entries}))
    state = ExtractionState(path)
    assert state.mode(URL, GGUF) == "json_object"
    assert state.mode(URL, "other") is None


async def test_no_credential_in_an_endpoint_url_is_stored(path):
    secret_url = "https://user:sk-secret@llm.example.com/v1?api-key=sk-other"
    state = ExtractionState(path)
    state.use(secret_url, "m")
    state.set_mode(secret_url, "m", "json_schema")
    await state.save()
    text = path.read_text()
    assert "sk-secret" not in text and "sk-other" not in text
    assert ExtractionState(path).mode(secret_url, "m") == "json_schema"
    assert public_url(secret_url) == "https://llm.example.com/v1"


async def test_in_memory_only_without_a_path(tmp_path):
    state = ExtractionState(None)
    state.set_mode(URL, GGUF, "text")
    await state.save()
    assert state.mode(URL, GGUF) == "text"
    assert list(tmp_path.iterdir()) == []


async def test_a_save_that_fails_is_logged_not_raised(tmp_path, caplog):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    state = ExtractionState(blocker / "extraction-state.json")
    state.set_mode(URL, GGUF, "text")
    with caplog.at_level(logging.WARNING, logger="memory.extraction"):
        await state.save()
    assert "cannot save the extraction state" in caplog.text
    assert state.dirty
