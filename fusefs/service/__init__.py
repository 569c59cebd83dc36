"""The data service: the only side that holds a volume's credentials, talks to its store and
reads or writes the node cache (../shared/DESIGN.md, "Trust boundary").

- ``api``    ``DataClient``, what the filesystem layer needs of its data (one interface, two ends)
- ``scope``  ``Scope``: what one grant may touch (bucket prefix, read-only)
- ``local``  ``LocalData``: the service for one grant, in this process (``objfs mount``, and the
             service's side of every grant connection)
- ``daemon`` the node's data service process: grants from the CSI node plugin, one connection each

The wire between a sidecar and the service is ``fusefs.wire.grant``.
"""
