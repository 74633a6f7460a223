"""The bundled service modules: echo, lastsaid (the seed page's two examples), chat, kv, proxy.

They are service modules like any user's: mpnet's loader runs them (in workers, never in the
master) with ``module`` injected, as ``mpnet.services.<name>``; they are not meant to be imported
directly. ``modules = ["kv"]`` finds them after the folders in ``module_paths``.
"""
