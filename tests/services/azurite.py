"""A real Azure Blob Storage server for tests: Azurite, Microsoft's emulator, on 127.0.0.1.

``launch/install.sh`` installs it with npm into ``.venv/azurite`` where npm exists
(:func:`azurite_command` also finds one on PATH). Blobs live in the server's memory; it runs
in its own session (process group), which ``stop`` signals as a whole.

Clients reach it the way object_store (obstore) does for an emulator: ``AZURE_STORAGE_USE_EMULATOR=true``
with Azurite's well-known development account, at ``AZURITE_BLOB_STORAGE_URL`` (:attr:`Azurite.env`).
Containers are made with one REST call signed by the account's shared key (obstore cannot
make containers; the Azure SDK would add itself and its dependencies to every image for it).

Usage::

    with Azurite(tmp_dir) as azure:
        os.environ.update(azure.env)
        azure.create_container("cells")  # then az://cells/... is readable and writable
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import os
import shutil
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from services.processes import LoggedServer, free_port, stop_group

ACCOUNT = "devstoreaccount1"  # Azurite's development account and its published key
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
API_VERSION = "2021-08-06"


def azurite_command() -> str | None:
    """The azurite-blob program: the virtual environment's (launch/install.sh), else on PATH."""
    beside = Path(sys.prefix) / "azurite" / "node_modules" / ".bin" / "azurite-blob"
    return str(beside) if beside.exists() else shutil.which("azurite-blob")


class AzuriteError(RuntimeError):
    """The server did not come up; the message holds the tail of its log."""


class Azurite(LoggedServer):
    error = AzuriteError

    def __init__(self, state_dir: str | os.PathLike[str]) -> None:
        self.state_dir = Path(state_dir)
        self.log_path = self.state_dir / "azurite.log"
        self.port = 0
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        return {"AZURE_STORAGE_USE_EMULATOR": "true", "AZURITE_BLOB_STORAGE_URL": self.url}

    def __enter__(self) -> Azurite:
        self.start()
        return self

    def start(self, timeout_s: float = 30.0) -> None:
        command = azurite_command()
        if command is None:
            raise AzuriteError("azurite-blob not found: npm install --prefix .venv/azurite azurite")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.process = self._spawn(
            [command, "--blobHost", "127.0.0.1", "--blobPort", str(self.port), "--inMemoryPersistence",
             "--skipApiVersionCheck", "--disableTelemetry", "--silent"],
            env={**os.environ}, cwd=self.state_dir,
        )  # fmt: skip
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self._fail(f"azurite exited with {self.process.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.2)
        self._fail(f"azurite did not listen on {self.url} within {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process is not None:
            stop_group(self.process, timeout_s)
            self.process = None

    def create_container(self, name: str) -> None:
        """Make container ``name`` (Put Container, signed with the account's shared key); one that exists is kept."""
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%a, %d %b %Y %H:%M:%S GMT")
        headers = {"x-ms-date": date, "x-ms-version": API_VERSION}
        # the string to sign of a bodiless PUT: 12 empty standard headers, the x-ms- headers, the resource
        signed = "PUT\n" + "\n" * 11 + "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
        signed += f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
        key = base64.b64decode(ACCOUNT_KEY)
        signature = base64.b64encode(hmac.new(key, signed.encode(), hashlib.sha256).digest()).decode()
        request = urllib.request.Request(
            f"{self.url}/{ACCOUNT}/{name}?restype=container", method="PUT",
            headers={**headers, "Authorization": f"SharedKey {ACCOUNT}:{signature}", "Content-Length": "0"},
        )  # fmt: skip
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never a proxy
        try:
            opener.open(request, timeout=10).close()
        except urllib.error.HTTPError as err:
            if err.code != 409:  # 409 ContainerAlreadyExists
                raise
