"""Start the RATE demo: python app.py [--host 127.0.0.1] [--port 7860] [--share]."""

import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(__file__).resolve().parent / "outputs" / "gradio"))


@dataclass
class Args:
    """Serve the RATE demo (Gradio). Host and port also come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT."""

    host: str = os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1")
    """address to listen on (0.0.0.0 to serve other machines)"""
    port: int = int(os.environ.get("GRADIO_SERVER_PORT", "7860"))
    """port to listen on"""
    share: bool = False
    """also open a temporary public gradio.live link (needs network)"""


def main() -> None:
    import tyro

    args = tyro.cli(Args)
    if not 1 <= args.port <= 65535:
        raise SystemExit(f"error: --port must be from 1 to 65535, got {args.port}")
    from app.ui import build_demo

    build_demo().queue(default_concurrency_limit=2).launch(server_name=args.host, server_port=args.port,
                                                           share=args.share)


if __name__ == "__main__":
    main()
