"""The journal: kvd's event log (not Python logging).

``format`` fixes the record encoding, ``reader`` checks and reads records
back, ``file`` is the embedded segment-file journal behind the ``Journal``
interface in ``journal``, ``lock`` keeps one server per data directory.
"""
