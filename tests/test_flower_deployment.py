"""A real Flower deployment on loopback (issue #6): one SuperLink, two SuperNodes, `flwr run`
of examples/flower, two rounds; every process started here is stopped by its pid."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr", reason="Flower not installed (pip install 'sparsefl[flower]')")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 60.0) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def alive_in(groups: set[int]) -> list[int]:
    """Live (non-zombie) processes whose process group is one of `groups`."""
    live = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in groups and fields[0] != "Z":
            live.append(int(d.name))
    return live


@pytest.mark.slow
def test_superlink_and_two_supernodes_run_two_rounds(tmp_path):
    if shutil.which("flower-superlink", path=str(BIN)) is None:
        pytest.skip("flower-superlink not installed next to this Python")
    home = tmp_path / "flwr-home"
    home.mkdir()
    link = free_port()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "local-deployment"\n\n[superlink.local-deployment]\n'
        f'address = "127.0.0.1:{link}"\ninsecure = true\n')
    env = dict(os.environ, FLWR_HOME=str(home), FLWR_TELEMETRY_ENABLED="0",
               FLWR_DISABLE_UPDATE_CHECK="1", FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
               PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    procs: list[subprocess.Popen] = []

    def start(*cmd: str, log: str) -> subprocess.Popen:
        with open(tmp_path / log, "w") as f:  # the child keeps its own copy of the fd
            p = subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], env=env, cwd=tmp_path,
                                 stdout=f, stderr=subprocess.STDOUT,
                                 start_new_session=True)  # own group: children go with it
        procs.append(p)
        return p

    out = tmp_path / "run"
    try:
        start("flower-superlink", "--insecure", "--port", str(link), log="superlink.log")
        wait_port(link)
        for i in range(2):
            start("flower-supernode", "--insecure", "--superlink", f"127.0.0.1:{link}",
                  "--port", str(free_port()), "--node-config",
                  f"partition-id={i} num-partitions=2", log=f"supernode{i}.log")
        run = subprocess.run(
            [str(BIN / "flwr"), "run", str(ROOT / "examples" / "flower"), "local-deployment",
             "--stream", "--run-config", f"sparsefl-out='{out}'"],
            env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
        rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [r["round"] for r in rounds] == [1, 2]
        assert all(sorted(r["clients"]) == [0, 1] for r in rounds)
        assert rounds[-1]["acc"] > 0.2  # learned something in two rounds (10 classes)
        assert (out / "ckpt-000002.safetensors").is_file()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        groups = {p.pid for p in procs}
        t0 = time.monotonic()
        while alive_in(groups) and time.monotonic() - t0 < 20:
            for g in groups:  # stragglers (the apps' own child processes)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(g, signal.SIGKILL)
            time.sleep(0.5)
        assert not alive_in(groups), alive_in(groups)
