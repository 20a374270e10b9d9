"""A real S3 server on loopback for tests and benchmarks: moto_server in its own process.

    with LoopbackS3() as s3:
        subprocess.run([...], env=s3.env())   # every AWS client pointed at it, fake keys

Like ``numpy.testing``, this ships with the package so that the tests and the benchmarks
(which do not import test code) start the server one way. It never talks to real AWS.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

START_TIMEOUT = 60.0  # seconds moto_server may take to answer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LoopbackS3:
    """moto_server on a free 127.0.0.1 port (pinned to ``cores`` when given), started on
    ``__enter__`` and stopped on ``__exit__``."""

    def __init__(self, *, cores: set[int] | None = None, timeout: float = START_TIMEOUT) -> None:
        self.cores, self.timeout = cores, timeout
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LoopbackS3:
        exe = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
        self._log = tempfile.TemporaryFile()
        cores = self.cores
        self.proc = subprocess.Popen(
            [exe, "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores),
        )
        try:
            self._wait_until_it_answers()
        except BaseException:
            self.__exit__()
            raise
        return self

    def _wait_until_it_answers(self) -> None:
        """Poll the port itself (the condition), backing off, until the server answers."""
        deadline, pause = time.monotonic() + self.timeout, 0.01
        while True:
            try:
                urllib.request.urlopen(self.url, timeout=1)
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self._log.seek(0)
                    said = self._log.read().decode(errors="replace")[-1000:]
                    raise RuntimeError(
                        f"moto_server did not start on {self.url} within {self.timeout:g} s "
                        f"(exit {self.proc.poll()}); is moto[server] installed? Its output: "
                        f"{said or '(none)'}"
                    ) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.5)

    def env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's environment) without real AWS settings, pointed
        at this server with fake credentials."""
        env = {k: v for k, v in (os.environ if base is None else base).items()
               if not k.startswith("AWS_")}  # fmt: skip
        env.update(AWS_ENDPOINT_URL=self.url, AWS_ACCESS_KEY_ID="testing",
                   AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1",
                   AWS_CONFIG_FILE=os.devnull, AWS_SHARED_CREDENTIALS_FILE=os.devnull)  # fmt: skip
        return env

    def cpu_seconds(self) -> float:
        """The server's CPU time so far (user + system, from /proc)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
