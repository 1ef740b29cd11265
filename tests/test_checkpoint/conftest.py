"""Fixtures for the checkpoint-safety tests: a local HTTP server (127.0.0.1 only, nothing
leaves the machine), torch hub's cache in a temporary directory, and a pickle payload that
only creates a marker file (so a test can tell that it ran, and nothing harmful happens)."""
import functools
import http.server
import threading

import pytest
import torch


class MarkerPayload:
    """Unpickled with ``weights_only=False``, creates the file ``path`` (and nothing else)."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, 'w')


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

    def log_message(self, *args):  # no request lines in the test output
        pass


@pytest.fixture(scope='session')
def http_root(tmp_path_factory):
    """``(directory, base URL)``: files written into the directory are served at the URL by
    an ``http.server`` on 127.0.0.1 in a thread."""
    root = tmp_path_factory.mktemp('served')
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f'http://127.0.0.1:{server.server_address[1]}'
    server.shutdown()
    server.server_close()


@pytest.fixture
def hub_dir(tmp_path):
    """torch hub's cache directory, in this test's temporary directory."""
    previous = torch.hub.get_dir()
    hub = tmp_path / 'hub'
    torch.hub.set_dir(str(hub))
    yield hub
    torch.hub.set_dir(previous)


@pytest.fixture(scope='session')
def payload():
    """:class:`MarkerPayload`: ``payload(path)`` in a pickle creates ``path`` if it runs."""
    return MarkerPayload
