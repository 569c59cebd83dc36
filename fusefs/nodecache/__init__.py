"""The node-wide cache on local disk, shared by every volume on a node; written only by the data
service (``fusefs.service``). ``cache.NodeCache`` is its one interface; the other modules are its named
parts (listed in ``cache``'s docstring). Nothing is imported here: a pod's server imports ``keys`` only,
never diskcache."""
