"""Start the RATE demo: python app.py [--host 127.0.0.1] [--port 7860] [--keep-envs 2] [--share]."""

import os
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


def _environ_int(name: str, default: int, what: str) -> int:
    """The environment variable `name` as a default (`default` without it); a value that is no whole number
    ends the app in one line that says it must be `what`."""
    value = os.environ.get(name, str(default))
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"error: {name} must be {what}, got {value!r}") from None


@dataclass
class Args:
    """Serve the RATE demo (Gradio). Host and port also come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT,
    --keep-envs from RATE_APP_KEEP_ENVS; videos and Gradio's files go under outputs/ (RATE_APP_OUTPUTS:
    elsewhere; a temporary folder where outputs/ cannot be written, e.g. a read-only checkout)."""

    host: str = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    """address to listen on (0.0.0.0 to serve other machines)"""
    port: int = _environ_int("GRADIO_SERVER_PORT", 7860, "a port number")
    """port to listen on"""
    keep_envs: int = _environ_int("RATE_APP_KEEP_ENVS", 2, "a whole number of envs")
    """envs slow to make (Memory Maze's: 2.5 s and about 0.55 GB each) kept idle for the next runs; 0: none"""
    share: bool = False
    """also open a temporary public gradio.live link (needs network)"""


def outputs_folder() -> Path:
    """The folder for the app's videos and Gradio's files: RATE_APP_OUTPUTS, else outputs/ here, else (not
    writable) a folder in the system's temporary folder, said in one line. Sets both for the app."""
    wanted = Path(os.environ.get("RATE_APP_OUTPUTS") or Path(__file__).resolve().parent / "outputs")
    try:
        wanted.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=wanted).close()
        folder = wanted
    except OSError as error:  # a folder of its own (a shared fixed name could be another user's)
        folder = Path(tempfile.mkdtemp(prefix="rate_app_outputs-"))
        print(f"{wanted} cannot be written ({error.strerror}): the app's videos go to {folder} "
              f"(set RATE_APP_OUTPUTS to choose)")
    os.environ["RATE_APP_OUTPUTS"] = str(folder)
    os.environ.setdefault("GRADIO_TEMP_DIR", str(folder / "gradio"))
    return folder


def main() -> None:
    import tyro

    args = tyro.cli(Args)
    if not 1 <= args.port <= 65535:
        raise SystemExit(f"error: --port must be from 1 to 65535, got {args.port}")
    if not 0 <= args.keep_envs <= 16:
        raise SystemExit(f"error: --keep-envs must be from 0 to 16 (each kept env holds about 0.55 GB), got "
                         f"{args.keep_envs}")
    check_address(args.host, args.port)  # before the demo starts its background work
    outputs = outputs_folder()  # before gradio is imported: it reads GRADIO_TEMP_DIR once
    from app.episodes import ENV_POOL
    from app.ui import APP_CSS, CLOSING, build_demo, wait_for_runs
    from rate_core.envs.subproc import STOP_STARTS

    ENV_POOL.limit = args.keep_envs  # before the warm-up plays
    demo = build_demo().queue(default_concurrency_limit=2)
    # SIGTERM (how hosts stop a server) takes Ctrl-C's way out: the runs stop and their envs close. Killed
    # outright, the app would leave the ViZDoom engine of a run under way running, orphaned.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:  # launch() returns when the server stops (Ctrl-C, SIGTERM)
        # allowed_paths: Gradio serves files from the working and temporary folders only, and outputs may be elsewhere
        demo.launch(server_name=args.host, server_port=args.port, share=args.share, allowed_paths=[str(outputs)],
                    css=APP_CSS)
    finally:
        CLOSING.set()  # the warm-up and runs stop: the exit would otherwise wait for them to play out
        STOP_STARTS.set()  # and env workers still starting (a Memory Maze run's) are stopped, not waited for
    # Then exit at once, once the runs CLOSING stops have closed their envs and the kept ones are closed:
    # the interpreter's own teardown, after a ViZDoom game had played in another thread, sometimes aborted
    # in native code ("terminate called without an active exception", exit status -6: 5 of 20 SIGTERMs
    # during the warm-up), with nothing of ours left to tear down by then.
    if not wait_for_runs(timeout=30):
        print("runs still under way 30 s after the server stopped; leaving them", flush=True)
    ENV_POOL.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_address(host: str, port: int) -> None:
    """SystemExit in one line when the app cannot listen on host:port: the port is taken, or the host
    is not an address of this machine (IPv4 or IPv6, as Gradio takes it)."""
    import errno
    import socket

    address = host.strip("[]")
    try:
        family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM)[0][0]
        with socket.create_server((address, port), family=family):
            pass
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            raise SystemExit(f"error: cannot serve on {host}:{port}: the port is in use; choose another --port, or "
                             f"stop what is listening there") from None
        reason = (error.strerror or str(error)).split(" (while")[0]
        raise SystemExit(f"error: cannot serve on {host}:{port} ({reason}); is {host} an address "
                         f"of this machine? (127.0.0.1: this machine only, 0.0.0.0: every network)") from None


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM while the app starts (once it serves, Gradio handles them)
        raise SystemExit("interrupted") from None
