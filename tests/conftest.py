"""Fixtures shared by the whole suite."""

from __future__ import annotations

import asyncio
import importlib
import inspect
import os
import traceback
from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import openai
import pytest
from blockbuster import BlockBuster, BlockBusterFunction, BlockingError
from hypothesis import HealthCheck, settings

from tests.agent_process import CALL_FAILED, RunningAgent, start_agent

# Property tests (the *_fuzz.py suites among them): `make test` runs a small, derandomized sample so CI is
# reproducible and fast; `make fuzz` (HYPOTHESIS_PROFILE=fuzz) runs many more random examples. No example
# database: failures are reported with their inputs and become @example regression cases, not hidden state.
settings.register_profile("ci", max_examples=100, deadline=None, derandomize=True, database=None)
settings.register_profile(
    "fuzz",
    max_examples=5000,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Our import packages. BlockBuster only fails a blocking call when one of these is on the call stack, so the
# test's own code, pytest and third-party libraries may block as they like; our code may not.
SCANNED_PACKAGES = ["agent", "drivers", "engines", "common"]
_OURS = tuple(str(Path(importlib.import_module(name).__file__ or "").parent) + os.sep for name in SCANNED_PACKAGES)
_TESTS = str(Path(__file__).parent) + os.sep
_ASYNCIO = str(Path(asyncio.__file__).parent) + os.sep
_ASYNC_CODE = inspect.CO_COROUTINE | inspect.CO_ITERABLE_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _also_allow(function: BlockBusterFunction, allowed: Callable[..., bool]) -> None:
    """Let `function` block when `allowed(*its arguments)` says so, besides BlockBuster's own exclusions."""
    checks = function.can_block_predicate  # non-blocking fds and sockets, stdout/stderr, ...
    function.can_block_predicate = lambda *args, **kwargs: checks(*args, **kwargs) or allowed(*args, **kwargs)


def _exempt(bb: BlockBuster) -> None:
    """The few places allowed to block while a loop runs, each with why it is fine."""
    # Test set-up, not agent code: async fixtures find the bundled model files through BundledModel.locate
    # (one stat per folder of an installed package) before anything they start is serving.
    bb.functions["os.stat"].can_block_in("tests/bundled.py", {"smollm2_gguf", "minilm_dir"})
    # pytest's log-file handler (log_file defaults to /dev/null) gets every warning our code logs with stdlib
    # logging, e.g. the scheduler's log.exception; /dev/null never blocks, and outside pytest records go to
    # stderr, which BlockBuster already allows.
    for write in ("io.TextIOWrapper.write", "io.BufferedWriter.write"):  # the text layer, then its flush
        _also_allow(bb.functions[write], lambda file, *_, **__: getattr(file, "name", None) == os.devnull)


def _made_synchronously_by_test_code(*_: object, **__: object) -> bool:
    """Whether test code made this blocking call itself, or through our synchronous helpers, with no coroutine
    or event-loop frame in between.

    That is a test blocking its own loop (our load_settings or ModelStore.get called from the test, a test's
    progress callback filling a disk), which `allow_blocking` permits; our coroutines and loop callbacks that the
    test awaits or starts stay checked.
    """
    frame = inspect.currentframe()
    while frame is not None:
        filename = frame.f_code.co_filename
        if filename.startswith(_TESTS) and filename != __file__:  # this check and its caller are not the test
            return True
        if frame.f_code.co_flags & _ASYNC_CODE or filename.startswith(_ASYNCIO):
            return False
        frame = frame.f_back
    return False


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[CALL_FAILED] = report.failed
    return report


@pytest.fixture(autouse=True)
def no_blocking_calls_on_the_loop(request: pytest.FixtureRequest) -> Iterator[BlockBuster]:
    """Fail any test in which our code makes a blocking call (file, socket, sleep, lock) on a running event loop.

    Armed for every test. Synchronous tests have no running loop, so nothing they do is checked. A test that
    calls our synchronous helpers from inside its loop on purpose says so with `@pytest.mark.allow_blocking(why)`:
    those direct calls may then block, while the agent code it awaits is still checked.
    """
    bb = BlockBuster(SCANNED_PACKAGES)
    _exempt(bb)
    if request.node.get_closest_marker("allow_blocking") is not None:
        for function in bb.functions.values():
            _also_allow(function, _made_synchronously_by_test_code)
    # A BlockingError raised in a loop callback, an aiohttp handler (a 500), a logging handler or under an
    # `except Exception` never reaches the test; every one raised is recorded and fails the test at teardown.
    raised: list[str] = []
    init = BlockingError.__init__

    def recording_init(error: BlockingError, func: str) -> None:
        init(error, func)
        ours = [frame for frame in traceback.extract_stack() if frame.filename.startswith(_OURS)]
        raised.append(f"{func} from {ours[-1].filename}:{ours[-1].lineno} ({ours[-1].name})" if ours else func)

    BlockingError.__init__ = recording_init  # type: ignore[method-assign,assignment]
    bb.activate()
    try:
        yield bb
    finally:
        bb.deactivate()
        BlockingError.__init__ = init  # type: ignore[method-assign]
    if raised and not request.node.stash.get(CALL_FAILED, False):  # a failed test already shows its error
        pytest.fail("blocking calls on the event loop: " + "; ".join(raised), pytrace=False)


@pytest.fixture(scope="session")
def running_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    """One real agent for the session's read-mostly API tests."""
    agent = start_agent(tmp_path_factory.mktemp("agent-home"))
    yield agent
    assert agent.stop() == 0


@pytest.fixture
def client(running_agent: RunningAgent) -> openai.OpenAI:
    """The official OpenAI SDK pointed at the agent (no retries, so errors surface as they are)."""
    return openai.OpenAI(base_url=running_agent.inference_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture
def fresh_home(tmp_path: Path) -> Path:
    return tmp_path / "home"
