"""A bench worker that dies the way llama.cpp does on an AMX CPU (for run_isolated's report)."""
import os
import signal


def segv(payload: dict) -> dict:
    os.kill(os.getpid(), signal.SIGSEGV)
    return {}
