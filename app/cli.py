"""`workbench dashboard` and `workbench demo` (mounted through the workbench.cli entry points)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from workbench.cli_options import fail
from workbench.workspace import Workspace

MAIN = Path(__file__).with_name("main.py")


def serve(workspace: Path, host: str, port: int) -> None:
    """Run the Streamlit app in the foreground (a port already in use fails at once, naming --port)."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as err:
        fail(
            f"cannot serve on {host}:{port} ({err.strerror or err}); another server holds it: pass --port N "
            "(e.g. --port 8502), or stop the other server"
        )
    url = f"http://{host}:{port}"
    typer.secho(f"dashboard: {url}  (workspace {workspace}; Ctrl-C to stop)", fg=typer.colors.GREEN)
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(MAIN),
        "--server.address",
        host,
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
        "--client.toolbarMode",
        "minimal",
        "--",
        "--workspace",
        str(workspace),
    ]
    server = subprocess.Popen(command, start_new_session=True)  # its own group: one stop reaches all of it
    stopped: list[int] = []
    previous = {
        sig: signal.signal(sig, lambda signum, frame: stopped.append(signum))
        for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        while server.poll() is None and not stopped:
            with contextlib.suppress(subprocess.TimeoutExpired):
                server.wait(timeout=0.2)
    finally:
        _stop_server(server)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        typer.echo(f"dashboard stopped ({signal.Signals(stopped[0]).name}); the server on {url} is down")
    elif server.returncode != 0:
        fail(f"the dashboard server exited with code {server.returncode}; its output is above")


def _stop_server(server: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM the server's process group, wait up to ``grace`` seconds, then SIGKILL what is left of the group."""
    if server.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def dashboard(
    workspace: Annotated[Path | None, typer.Option("--workspace", "-w", help="Workspace directory.")] = None,
    host: Annotated[
        str, typer.Option(help="Address to bind; 127.0.0.1 keeps it on this machine.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port.")] = 8501,
) -> None:
    """Open the Streamlit dashboard on the workspace (binds 127.0.0.1 unless --host says otherwise)."""
    serve(Workspace(workspace).root, host, port)


def demo(
    workspace: Annotated[Path | None, typer.Option("--workspace", "-w", help="Workspace directory.")] = None,
    serve_dashboard: Annotated[
        bool, typer.Option("--serve/--no-serve", help="Start the dashboard at the end.")
    ] = True,
    host: Annotated[str, typer.Option(help="Dashboard address.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Dashboard port.")] = 8501,
) -> None:
    """Train the embedded zoo, run the analyses, then open the dashboard (reruns reuse what is done)."""
    from workbench.app.demo import DemoStepError, run_demo  # deferred: CLI start-up (torch)

    try:
        ws = run_demo(workspace)
    except DemoStepError as err:
        fail(err)
    if serve_dashboard:
        serve(ws.root, host, port)
