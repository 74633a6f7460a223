"""The bundled service modules (installed as ``mpnet.bundled``). They are loaded by mpnet's
module loader, which injects ``module``; they are not meant to be imported directly."""
