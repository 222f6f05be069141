"""The SoC power mode through NVIDIA's `nvpmodel` tool, run asynchronously (research/hardware.md section 1).

`nvpmodel -q` prints the active mode ("NV Power Mode: MAXN" then its id on the next line), `nvpmodel -p --verbose`
lists the modes ("NVPM VERB: POWER_MODEL: ID=0 NAME=MAXN" followed by that mode's settings), and so does the
config file (`< POWER_MODEL ID=0 NAME=MAXN >` blocks, /etc/nvpmodel.conf). `nvpmodel -m N` switches.

Some switches only take effect after a reboot, and then nvpmodel asks on stdin whether to reboot now (jtop pipes
"YES"). NVIDIA's own nvpmodel_indicator knows such a switch by a change of TPC_POWER_GATING (GPU TPCs are gated
at boot) and skips it unless forced. This driver never reboots the box: it refuses those switches up front with
a DriverError, and if the tool still asks it answers "NO" and reports the refusal.
"""

from __future__ import annotations

import asyncio
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from common.aio import wait_for
from drivers.base import DriverError, DriverState, DriverStateError, PowerMode

_MODEL_HEADER = re.compile(r"^(?:<\s*)?POWER_MODEL:?\s+ID=(\d+)\s+NAME=([^\s>]+)\s*>?\s*$")
_QUERY_NAME = re.compile(r"NV Power Mode:\s*(\S+)")
_VERBOSE_PREFIX = re.compile(r"^NVPM VERB:\s?")
# Settings whose change needs a reboot to apply.
REBOOT_SETTINGS = ("TPC_POWER_GATING",)


@dataclass(frozen=True)
class ModeSpec:
    """A power mode and its settings ("PARAM ARG" -> value, e.g. "TPC_POWER_GATING TPC_PG_MASK" -> "0")."""

    mode: PowerMode
    settings: Mapping[str, str] = field(default_factory=dict)


def parse_modes(text: str) -> list[ModeSpec]:
    """Modes from `/etc/nvpmodel.conf` or from `nvpmodel -p --verbose` output (the same blocks, prefixed)."""
    modes: list[ModeSpec] = []
    current: tuple[PowerMode, dict[str, str]] | None = None
    for raw in text.splitlines():
        line = _VERBOSE_PREFIX.sub("", raw.strip()).strip()
        header = _MODEL_HEADER.match(line)
        if header:
            if current:
                modes.append(ModeSpec(*current))
            current = (PowerMode(int(header.group(1)), header.group(2)), {})
            continue
        words = line.split()
        if current is None:
            continue
        if not words or line.startswith(("<", "#")) or "=" in line:
            # A blank line, another block (< PARAM ...>, < PM_CONFIG ...>) or a key=value line ends the mode.
            modes.append(ModeSpec(*current))
            current = None
        elif len(words) == 3:
            current[1][f"{words[0]} {words[1]}"] = words[2]
    if current:
        modes.append(ModeSpec(*current))
    return modes


def parse_query(text: str) -> tuple[str, int | None]:
    """`nvpmodel -q` output -> (mode name, mode id or None when the id line is missing)."""
    lines = text.splitlines()
    for index, line in enumerate(lines):
        match = _QUERY_NAME.search(line)
        if match:
            following = next((rest.strip() for rest in lines[index + 1 :] if rest.strip()), "")
            return match.group(1), int(following) if following.isdigit() else None
    raise DriverError(f"nvpmodel -q printed no 'NV Power Mode:' line: {text.strip()[:200]!r}")


def needs_reboot(current: ModeSpec, target: ModeSpec) -> bool:
    """True when switching changes a setting that only applies at boot (TPC power gating)."""

    def boot_settings(spec: ModeSpec) -> dict[str, str]:
        return {k: v for k, v in spec.settings.items() if k.split()[0] in REBOOT_SETTINGS}

    return boot_settings(current) != boot_settings(target)


class NvpModel:
    """PowerModeControl over the `nvpmodel` command (or a privileged helper with the same interface)."""

    def __init__(
        self,
        command: str = "nvpmodel",
        conf_path: Path | None = Path("/etc/nvpmodel.conf"),
        timeout: float = 20.0,
        restore_on_close: bool = False,
    ) -> None:
        self._command = command
        self._argv: Sequence[str] = shlex.split(command)  # "sudo -n nvpmodel" works too
        if not self._argv:
            raise DriverError("the nvpmodel command is empty")
        self._conf_path = conf_path
        self._timeout = timeout
        self._restore_on_close = restore_on_close
        self._specs: dict[int, ModeSpec] = {}
        self._opened_in: PowerMode | None = None
        self._state = DriverState.CLOSED

    @property
    def name(self) -> str:
        """E.g. "nvpmodel:nvpmodel"."""
        return f"nvpmodel:{self._command}"

    @property
    def state(self) -> DriverState:
        """Lifecycle state."""
        return self._state

    async def open(self) -> None:
        """Load the mode table (config file, else `nvpmodel -p --verbose`) and read the active mode."""
        text = await asyncio.to_thread(self._read_conf)
        source = str(self._conf_path)
        if text is None:
            text = await self._run_checked("-p", "--verbose")
            source = f"{self._command} -p --verbose"
        specs = parse_modes(text)
        if not specs:
            raise DriverError(f"{self.name}: found no POWER_MODEL entries in {source}")
        self._specs = {spec.mode.id: spec for spec in specs}
        self._state = DriverState.OPEN
        try:
            self._opened_in = await self.get()
        except BaseException:
            self._state = DriverState.CLOSED
            raise

    async def close(self) -> None:
        """Leave the mode as it is (a lower mode is the safer one), or restore the opening mode if configured."""
        if self._state is DriverState.CLOSED:
            return
        try:
            if self._restore_on_close and self._opened_in is not None:
                await self.set(self._opened_in.id)
        finally:
            self._state = DriverState.CLOSED

    async def modes(self) -> list[PowerMode]:
        """Every mode the board defines, by id."""
        self._require_open()
        return [self._specs[key].mode for key in sorted(self._specs)]

    async def get(self) -> PowerMode:
        """The active mode, from `nvpmodel -q`."""
        self._require_open()
        name, mode_id = parse_query(await self._run_checked("-q"))
        if mode_id is None:
            by_name = [spec.mode for spec in self._specs.values() if spec.mode.name == name]
            if not by_name:
                raise DriverError(f"{self.name}: active mode {name!r} is not in the mode table")
            return by_name[0]
        return PowerMode(mode_id, name)

    async def set(self, mode_id: int) -> None:
        """Switch to `mode_id`; DriverError for an unknown mode, one that needs a reboot, or a failed switch."""
        self._require_open()
        target = self._specs.get(mode_id)
        if target is None:
            known = ", ".join(f"{m.id} {m.name}" for m in await self.modes())
            raise DriverError(f"{self.name}: power mode {mode_id} does not exist; this board has {known}")
        current = await self.get()
        if current.id == mode_id:
            return
        current_spec = self._specs.get(current.id)
        if current_spec is not None and needs_reboot(current_spec, target):
            raise DriverError(
                f"{self.name}: switching from mode {current.id} ({current.name}) to {mode_id} ({target.mode.name}) "
                "changes GPU TPC power gating and only applies after a reboot; refused (the agent never reboots "
                "the device). Switch by hand with `nvpmodel -m` and reboot if that mode is wanted."
            )
        # Whatever happens, the answer to "reboot now?" is NO.
        code, output = await self._run("-m", str(mode_id), stdin=b"NO\n")
        if re.search(r"reboot", output, re.IGNORECASE):
            raise DriverError(
                f"{self.name}: mode {mode_id} ({target.mode.name}) needs a reboot to apply; "
                "declined, the mode is unchanged until someone reboots the device"
            )
        if code != 0 or "NVPM ERROR" in output:
            raise DriverError(f"{self.name}: `-m {mode_id}` failed (exit {code}): {_tail(output)}")
        now = await self.get()
        if now.id != mode_id:
            raise DriverError(
                f"{self.name}: asked for mode {mode_id} ({target.mode.name}) but the device reports "
                f"{now.id} ({now.name}): {_tail(output)}"
            )

    # ------------------------------------------------------------------ subprocess

    def _read_conf(self) -> str | None:
        if self._conf_path is None or not self._conf_path.is_file():
            return None
        try:
            return self._conf_path.read_text()
        except OSError as exc:
            raise DriverError(f"{self.name}: cannot read {self._conf_path}: {exc.strerror or exc}") from exc

    async def _run_checked(self, *args: str) -> str:
        code, output = await self._run(*args)
        if code != 0:
            raise DriverError(f"{self.name}: `{' '.join(args)}` exited {code}: {_tail(output)}")
        return output

    async def _run(self, *args: str, stdin: bytes | None = None) -> tuple[int, str]:
        """Run the tool with `args`; (exit code, stdout+stderr). Killed on timeout or cancellation."""
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv,
                *args,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
        except FileNotFoundError as exc:
            raise DriverError(
                f"{self.name}: {self._argv[0]!r} not found; nvpmodel exists only on Jetson "
                "(JetPack), use the sim power mode elsewhere"
            ) from exc
        except PermissionError as exc:
            raise DriverError(f"{self.name}: not allowed to run {self._argv[0]!r}: {exc.strerror}") from exc
        try:
            out, _ = await wait_for(process.communicate(stdin), self._timeout)
        except (TimeoutError, asyncio.TimeoutError):
            await _kill(process)
            raise DriverError(f"{self.name}: `{' '.join(args)}` gave no answer within {self._timeout:.1f}s") from None
        except BaseException:
            await _kill(process)  # cancelled: never leave the tool running behind us
            raise
        return process.returncode if process.returncode is not None else -1, out.decode(errors="replace")

    def _require_open(self) -> None:
        if self._state is not DriverState.OPEN:
            raise DriverStateError(f"{self.name} is {self._state.value}; open() it first")


async def _kill(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.kill()
        await asyncio.shield(process.wait())


def _tail(output: str) -> str:
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return " | ".join(lines[-3:]) or "(no output)"
