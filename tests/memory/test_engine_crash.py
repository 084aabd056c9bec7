"""A worker process killed with SIGKILL mid-job: the restarted engine finishes the
job exactly once, whether the kill came during the LLM call or during the write."""

import asyncio
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest
from scripted_llm import Call, ScriptedLLM, ops

from memory.config import LLMConfig, MemoryConfig, SpoolConfig
from memory.engine import MemoryEngine
from memory.models import Scope

HERE = Path(__file__).parent
ALICE = Scope(user_id="alice")

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from datetime import UTC, datetime
    from pathlib import Path
    sys.path.insert(0, sys.argv[1])
    from helpers import HashEmbedder
    from scripted_llm import ScriptedLLM
    from test_engine_crash import config, decision
    from memory.engine import MemoryEngine
    from memory.models import Exchange, Scope

    async def main():
        data_dir, phase = Path(sys.argv[2]), sys.argv[3]
        llm = ScriptedLLM(responder=decision)
        if phase == "deciding":
            llm.hold()  # the model never answers: killed while waiting for it
        client = llm.client()
        engine = await MemoryEngine.open(
            config(), data_dir, default_base_url="http://llm.test/v1",
            http_client=client, embedder=HashEmbedder(),
        )
        stuck = llm.entered
        if phase == "applying":
            # Killed half-way through the write: new rows in, history not yet.
            stuck = asyncio.Event()
            async def record(entries):
                stuck.set()
                await asyncio.Event().wait()
            engine.store._record = record
        await engine.start()
        exchange = Exchange(
            scope=Scope(user_id="alice"),
            messages=[{"role": "user", "content": "I moved to Munich. I like jazz."}],
            reply="Nice!", at=datetime(2026, 3, 13, tzinfo=UTC),
        )
        print(await engine.record_exchange(exchange), flush=True)
        await stuck.wait()
        print("stuck", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def config() -> MemoryConfig:
    return MemoryConfig(
        llm=LLMConfig(api_key="sk-test-0123456789abcdefghij"),
        spool=SpoolConfig(lease_seconds=1.0, poll_interval=0.2, backoff_initial=0.01),
    )


def decision(call: Call):
    berlin = next(m["id"] for m in call.memories if "Berlin" in m["text"])
    return ops(
        {"op": "UPDATE", "id": berlin, "text": "User lives in Munich"},
        {"op": "ADD", "text": "User likes jazz"},
    )


async def open_engine(data_dir: Path, llm: ScriptedLLM, embedder) -> MemoryEngine:
    return await MemoryEngine.open(
        config(),
        data_dir,
        default_base_url="http://llm.test/v1",
        http_client=llm.client(),
        embedder=embedder,
    )


@pytest.mark.parametrize("phase", ["deciding", "applying"])
async def test_a_sigkilled_worker_is_replaced_and_the_job_done_exactly_once(
    tmp_path, embedder, phase
):
    data_dir = tmp_path / "data"
    engine = await open_engine(data_dir, ScriptedLLM(), embedder)
    await engine.add(ALICE, text="User lives in Berlin", infer=False)
    await engine.close()

    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(HERE),
        str(data_dir),
        phase,
        stdout=asyncio.subprocess.PIPE,
        cwd=HERE,
    )
    try:
        job_id = (await asyncio.wait_for(child.stdout.readline(), 60)).decode().strip()
        assert (await asyncio.wait_for(child.stdout.readline(), 60)).strip() == b"stuck"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        await child.wait()

    llm = ScriptedLLM(responder=decision)
    engine = await open_engine(data_dir, llm, embedder)
    try:
        await engine.start()
        info = await engine.wait(job_id, timeout=60)
        assert (info.state, info.attempts) == ("done", 2)
        # A decision stored before the kill is replayed, not asked for again.
        assert len(llm.calls) == (1 if phase == "deciding" else 0)
        active = sorted(m.text for m in await engine.store.list(ALICE))
        assert active == ["User likes jazz", "User lives in Munich"]
        everything = await engine.store.list(ALICE, include_superseded=True)
        assert sorted(m.text for m in everything) == [
            "User likes jazz",
            "User lives in Berlin",
            "User lives in Munich",
        ]
        munich = next(m for m in everything if m.text == "User lives in Munich")
        events = [(h.event, h.new_text) for h in await engine.store.history(ALICE, munich.id)]
        assert events.count(("UPDATE", "User lives in Munich")) == 1
    finally:
        await engine.close()
