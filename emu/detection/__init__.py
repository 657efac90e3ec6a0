"""Detection: what an observer sees of a thread and whether it is in the seed's state.

``view`` (ThreadView and the built-in detector), ``signals`` (symbol, code and stack signals),
``unwind`` and ``prologue`` (x64 stack walking), ``observers`` (thread states and the contexts a
kernel debugger or GetThreadContext reads), ``score`` (detectors against the ground truths).
"""
