"""A module that starts a thread when it is imported: a launcher that preloads it must
refuse to fork (tests/test_helpers.py)."""

import threading

_stop = threading.Event()
threading.Thread(target=_stop.wait, name="probe-thread", daemon=True).start()
