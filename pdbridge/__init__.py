import os as _os

# A TP worker process (Engine spawns it with this set): ignore Ctrl-C from its first import on.
# A terminal's Ctrl-C reaches every process of the group, and a worker killed mid-import prints
# a traceback of its own; the engine's process decides how its ranks stop (Engine.close).
if _os.environ.get("PDBRIDGE_TP_WORKER") == "1":
    import signal as _signal
    _signal.signal(_signal.SIGINT, _signal.SIG_IGN)
