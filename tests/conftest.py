"""Settings the whole test session shares."""

import signal

# A shell's background job (`pytest &`, nohup) starts with Ctrl-C ignored, and Python keeps an inherited
# SIG_IGN, as would every process the tests start: the tests of what Ctrl-C does (an app, env workers)
# need it as a terminal gives it, whoever started pytest.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
