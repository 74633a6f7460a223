"""Everything that runs inside a worker process (installed as ``mpnet.workers``, as gunicorn's
``workers/`` package): the event loop and its life (:mod:`.worker`), the module loader and the
``module`` object (:mod:`.module`, :mod:`.provider`), connections (:mod:`.connection`), port
multiplexing (:mod:`.multiplex`), TLS glue (:mod:`.tls`), and the worker's end of the channel
(:mod:`.channel`) and of the shared tables (:mod:`.shared`).

The master never imports this package's runtime: it forks, and the child calls
:func:`mpnet.workers.worker.worker_process`.
"""
