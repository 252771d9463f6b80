"""What crosses a process boundary: typed records, the pickle-free codec, identities and the coordinator's RPCs.

Imports only the shared leaves (config, errors, compare, ...): every side can use it.
"""
