"""A live uvicorn server for the service tests: on 127.0.0.1, a free port, in a thread, stopped on exit."""

import contextlib
import socket
import threading
import time


@contextlib.contextmanager
def live_server(app, log_level: str = "warning"):
    """Serve `app` until the block ends; yields its base URL."""
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline and t.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        t.join(timeout=30)
        assert not t.is_alive(), "the server did not stop"
