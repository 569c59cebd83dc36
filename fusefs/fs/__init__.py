"""The filesystem: FUSE requests (``ops``) over inodes and listings (``meta``), block reads
(``read``) and uploads (``write``, ``parts``). It reaches its data only through
``fusefs.service.api.DataClient``."""
